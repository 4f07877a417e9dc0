"""IncrementalDetokenizer with the tiny byte-level tokenizer: multi-byte characters split
across tokens, stop strings spanning tokens, the hold-back that keeps a stop string off
the stream, how a request's final text is cut, and special tokens."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import AutoTokenizer

from plait.runtime.detokenizer import REPLACEMENT, IncrementalDetokenizer

SENTENCE = "The capital of France is Paris. What is two plus two?"
MULTIBYTE = "Café 😀 日本語 naïve — done."
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@dataclass
class Stream:
    pieces: list[str]  # what release(final=False) gave after each token
    last: str  # what release(final=True) gave after finish
    final: str  # what finish returned
    matched: str | None  # the stop string add() reported, if any
    fed: int  # how many tokens were fed

    @property
    def streamed(self) -> str:
        return "".join(self.pieces) + self.last


def run(tok, ids, stop=(), skip_special_tokens=True, stop_token_ids=()) -> Stream:
    """Drive a detokenizer the way the scheduler and a streaming request do: add a token,
    finish on a stop token or a stop string, else release what may be shown."""
    detok = IncrementalDetokenizer(tok, stop, skip_special_tokens)
    pieces: list[str] = []
    matched = None
    fed = 0
    for t in ids:
        fed += 1
        matched = detok.add(t)
        if t in stop_token_ids:
            final = detok.finish(drop_last=True)
            break
        if matched is not None:
            final = detok.finish(stop_at=matched)
            break
        pieces.append(detok.release(final=False))
    else:
        final = detok.finish()
    return Stream(pieces, detok.release(final=True), final, matched, fed)


# ---- multi-byte characters ----------------------------------------------------------


def test_multibyte_text_splits_characters_across_tokens(tok):
    """The precondition of the tests below: some tokens alone are partial UTF-8."""
    ids = tok.encode(MULTIBYTE)
    assert tok.decode(ids) == MULTIBYTE
    assert sum(REPLACEMENT in tok.decode([t]) for t in ids) >= 10


def test_streamed_pieces_never_contain_a_replacement_character(tok):
    s = run(tok, tok.encode(MULTIBYTE))
    assert all(REPLACEMENT not in piece for piece in s.pieces)
    assert REPLACEMENT not in s.last


def test_streamed_pieces_concatenate_to_the_full_decode(tok):
    ids = tok.encode(MULTIBYTE)
    s = run(tok, ids)
    assert s.final == tok.decode(ids) == MULTIBYTE
    assert "".join(s.pieces) == MULTIBYTE  # without stop strings nothing waits for the end
    assert s.last == ""


def test_a_partial_character_is_held_until_it_completes(tok):
    ids = tok.encode("Café")
    assert [tok.decode([t]) for t in ids] == ["C", "a", "f", REPLACEMENT, REPLACEMENT]
    detok = IncrementalDetokenizer(tok)
    for t in ids[:4]:
        detok.add(t)
    assert detok.text == "Caf"
    assert detok.release(final=False) == "Caf"
    detok.add(ids[4])
    assert detok.text == "Café"
    assert detok.release(final=False) == "é"


def test_text_tracks_the_decode_of_every_prefix_that_ends_on_a_character(tok):
    ids = tok.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(tok)
    for i, t in enumerate(ids):
        detok.add(t)
        decoded = tok.decode(ids[: i + 1])
        if not decoded.endswith(REPLACEMENT):
            assert detok.text == decoded


# ---- stop strings ------------------------------------------------------------------------


def test_stop_string_spanning_several_tokens_is_found_and_cut(tok):
    ids = tok.encode(SENTENCE)
    pieces = [tok.decode([t]) for t in ids]
    assert pieces[5:8] == [" Paris", ".", " What"]  # the stop spans these three tokens
    detok = IncrementalDetokenizer(tok, stop=["Paris. What"])
    results = [detok.add(t) for t in ids[:8]]
    assert results == [None] * 7 + ["Paris. What"]
    assert detok.text == "The capital of France is "


def test_stop_string_inside_one_token_cuts_that_token(tok):
    ids = tok.encode(SENTENCE)
    detok = IncrementalDetokenizer(tok, stop=["apit"])
    assert detok.add(ids[0]) is None
    assert detok.add(ids[1]) == "apit"  # " capital"
    assert detok.text == "The c"


def test_the_earliest_stop_string_wins(tok):
    s = run(tok, tok.encode(SENTENCE), stop=["two", "France", "Paris"])
    assert s.matched == "France"
    assert s.final == "The capital of "


def test_finish_stop_at_cuts_at_the_stop_string(tok):
    ids = tok.encode(SENTENCE)
    detok = IncrementalDetokenizer(tok, stop=["apit"])
    for t in ids[:2]:
        matched = detok.add(t)
    assert detok.finish(stop_at=matched) == "The c"
    assert detok.text == "The c"


def test_a_stop_string_that_never_completes_does_not_stop(tok):
    ids = tok.encode(SENTENCE)
    s = run(tok, ids, stop=["Paris is"])
    assert s.matched is None
    assert s.fed == len(ids)
    assert s.final == SENTENCE
    assert s.streamed == SENTENCE


def test_stop_string_of_multibyte_characters(tok):
    s = run(tok, tok.encode(MULTIBYTE), stop=["日本"])
    assert s.matched == "日本"
    assert s.final == "Café 😀 "
    assert s.streamed == s.final
    assert all(REPLACEMENT not in p for p in s.pieces)


def test_holdback_never_streams_text_of_the_stop_string(tok):
    """While streaming, text that could still be the start of a stop string is held:
    at every step what has been shown is a prefix of the final, cut text."""
    stop = "Paris. What"
    detok = IncrementalDetokenizer(tok, stop=[stop])
    shown = ""
    for t in tok.encode(SENTENCE):
        if detok.add(t) is not None:
            break
        shown += detok.release(final=False)
        assert "The capital of France is ".startswith(shown)
        assert "P" not in shown
    assert detok.finish(stop_at=stop) == "The capital of France is "
    assert shown + detok.release(final=True) == "The capital of France is "


def test_held_text_is_released_once_it_cannot_start_a_stop_string(tok):
    # "Paris. Why" is held while it may grow into the stop; each token moves the window.
    detok = IncrementalDetokenizer(tok, stop=["Paris. Why"])
    shown = ""
    for t in tok.encode(SENTENCE):
        assert detok.add(t) is None
        shown += detok.release(final=False)
    assert shown == SENTENCE[: len(SENTENCE) - (len("Paris. Why") - 1)]
    assert detok.finish() == SENTENCE
    assert shown + detok.release(final=True) == SENTENCE


def test_without_stop_strings_nothing_is_held_back(tok):
    detok = IncrementalDetokenizer(tok)
    shown = ""
    for t in tok.encode("Hello world."):
        detok.add(t)
        shown += detok.release(final=False)
        assert shown == detok.text
    assert shown == "Hello world."


def every_stop_in(text: str, max_len: int = 8):
    for start in range(len(text)):
        for n in range(1, max_len + 1):
            if start + n <= len(text) and not text[start : start + n].isspace():
                yield text[start : start + n]


@pytest.mark.parametrize("text", [SENTENCE, MULTIBYTE], ids=["ascii", "multibyte"])
def test_every_stop_string_is_found_at_its_first_occurrence_and_never_streamed(tok, text):
    ids = tok.encode(text)
    for stop in sorted(set(every_stop_in(text))):
        s = run(tok, ids, stop=[stop])
        cut = text[: text.find(stop)]
        # Stops on the first token whose text completes the stop string.
        fed = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))
        assert (s.matched, s.fed, s.final) == (stop, fed, cut), stop
        shown = ""
        for piece in s.pieces:
            shown += piece
            assert cut.startswith(shown), (stop, shown)
        assert s.streamed == cut, stop


# ---- finish -----------------------------------------------------------------------------


def test_finish_drop_last_drops_the_last_tokens_text(tok):
    ids = tok.encode("Hello world. The")
    period = tok.encode(".")[0]
    s = run(tok, ids, stop_token_ids=[period])
    assert s.fed == 6
    assert s.final == "Hello world"
    assert s.streamed == "Hello world"


def test_finish_drop_last_drops_a_visible_special_token(tok):
    ids = tok.encode("Hello" + IM_END)
    assert ids[-1] == tok.convert_tokens_to_ids(IM_END)
    s = run(tok, ids, skip_special_tokens=False, stop_token_ids=[ids[-1]])
    assert s.final == "Hello"
    assert s.streamed == "Hello"


def test_finish_without_arguments_is_the_decode_of_all_tokens(tok):
    ids = tok.encode(SENTENCE)
    detok = IncrementalDetokenizer(tok)
    for t in ids:
        detok.add(t)
    assert detok.finish() == SENTENCE
    assert detok.text == SENTENCE


SCENARIOS = {
    "no stop": dict(text=SENTENCE),
    "multibyte": dict(text=MULTIBYTE),
    "stop string": dict(text=SENTENCE, stop=["plus"]),
    "stop string never matched": dict(text=SENTENCE, stop=["two plus three"]),
    "stop string at the very start": dict(text=SENTENCE, stop=["The"]),
    "stop string at the very end": dict(text=SENTENCE, stop=["two?"]),
    "several stop strings": dict(text=MULTIBYTE, stop=["naïve", "😀 日"]),
    "stop token": dict(text=SENTENCE, stop_token_ids=[16]),  # "."
    "stop token and stop strings": dict(text=SENTENCE, stop=["What is"], stop_token_ids=[16]),
    "special token shown": dict(text="Hi" + IM_END + "\nok", skip_special_tokens=False),
    "special token hidden": dict(text="Hi" + IM_END + "\nok", stop=["\nok"]),
}


@pytest.mark.parametrize("case", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_streamed_pieces_concatenate_to_the_final_text(tok, case):
    case = dict(case)
    s = run(tok, tok.encode(case.pop("text")), **case)
    assert s.streamed == s.final


# ---- special tokens -----------------------------------------------------------------------


def test_skip_special_tokens_hides_im_end(tok):
    ids = tok.encode("Hello" + IM_END)
    assert run(tok, ids).final == "Hello"
    assert run(tok, ids, skip_special_tokens=False).final == "Hello" + IM_END


def test_special_tokens_in_the_middle_are_hidden_and_the_rest_kept(tok):
    text = "Hello" + IM_END + "\n<|im_start|>assistant\nok"
    s = run(tok, tok.encode(text))
    assert s.final == "Hello\nassistant\nok"
    assert s.streamed == s.final
