"""The batched sampler on hand-made logits: greedy and banned/allowed tokens, penalties
against a reference computation, top-k / top-p / min-p filtering, seeded and
batch-independent draws, and the logprobs it reports."""

from __future__ import annotations

import math

import pytest
import torch

from plait.runtime.constrained.bitmask import pack_bitmask, unpack_bitmask
from plait.runtime.sampler import Sampler, SamplingRow, apply_penalties, filter_logits
from plait.runtime.sampling_params import SamplingParams

V = 16
# A known distribution: softmax(log(PROBS)) == PROBS.
PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = torch.tensor(PROBS).log()


def make_row(
    generator: torch.Generator | None = None,
    input_ids=(1,),
    output_ids=(),
    banned_ids=(),
    allowed_mask=None,
    top_logprobs_num=0,
    **params,
) -> SamplingRow:
    return SamplingRow(
        SamplingParams(**params),
        generator,
        list(input_ids),
        list(output_ids),
        banned_ids,
        None if allowed_mask is None else pack_bitmask(allowed_mask),
        top_logprobs_num,
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(n: int, v: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, v, generator=gen(seed)) * 3


def kept(probs: torch.Tensor) -> list[int]:
    return torch.nonzero(probs > 0).flatten().tolist()


# ---- greedy, banned and allowed tokens ------------------------------------------


def test_greedy_rows_pick_the_argmax():
    logits = random_logits(4)
    rows = [make_row(temperature=0.0) for _ in range(4)]
    out = Sampler()(logits, rows, need_logprobs=False)
    assert out.next_ids == logits.argmax(dim=-1).tolist()


def test_top_k_one_is_greedy_whatever_the_temperature():
    logits = random_logits(3)
    rows = [make_row(gen(i), temperature=5.0, top_k=1) for i in range(3)]
    out = Sampler()(logits, rows, need_logprobs=False)
    assert out.next_ids == logits.argmax(dim=-1).tolist()


def test_banned_ids_are_not_chosen_by_greedy_even_as_argmax():
    logits = torch.zeros(1, V)
    logits[0, 3] = 10.0  # the argmax
    logits[0, 7] = 9.0
    logits[0, 5] = 8.0
    out = Sampler()(logits, [make_row(temperature=0.0, banned_ids=[3])], need_logprobs=False)
    assert out.next_ids == [7]
    out = Sampler()(logits, [make_row(temperature=0.0, banned_ids=[3, 7])], need_logprobs=False)
    assert out.next_ids == [5]


def test_banned_ids_are_never_drawn_when_sampling():
    logits = torch.zeros(1, V)
    logits[0, 3] = 20.0  # would be drawn almost surely
    g = gen(0)
    draws = [
        Sampler()(logits, [make_row(g, banned_ids=[3])], need_logprobs=False).next_ids[0]
        for _ in range(200)
    ]
    assert 3 not in draws
    assert len(set(draws)) > 5  # the rest stay reachable


def test_pack_bitmask_round_trips():
    allowed = torch.rand(3, 77) < 0.5
    allowed[0, 31] = True  # the sign bit of a word
    assert torch.equal(unpack_bitmask(pack_bitmask(allowed), 77), allowed)


def test_allowed_mask_restricts_greedy():
    logits = torch.arange(V, dtype=torch.float32).unsqueeze(0)  # argmax is V-1
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[2, 4, 6]] = True
    out = Sampler()(logits, [make_row(temperature=0.0, allowed_mask=mask)], need_logprobs=False)
    assert out.next_ids == [6]


def test_allowed_mask_restricts_sampling():
    logits = torch.zeros(1, V)
    logits[0, 0] = 20.0  # outside the mask
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[2, 4, 6]] = True
    g = gen(1)
    draws = {
        Sampler()(logits, [make_row(g, allowed_mask=mask)], need_logprobs=False).next_ids[0]
        for _ in range(100)
    }
    assert draws == {2, 4, 6}


def test_banned_ids_and_allowed_mask_combine():
    logits = torch.arange(V, dtype=torch.float32).unsqueeze(0)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[2, 4, 6]] = True
    row = make_row(temperature=0.0, allowed_mask=mask, banned_ids=[6])
    assert Sampler()(logits, [row], need_logprobs=False).next_ids == [4]


def test_masks_apply_only_to_their_own_row():
    logits = torch.zeros(2, V)
    logits[:, 3] = 10.0
    rows = [make_row(temperature=0.0, banned_ids=[3]), make_row(temperature=0.0)]
    assert Sampler()(logits, rows, need_logprobs=False).next_ids[1] == 3


def test_sampler_does_not_modify_the_callers_logits():
    logits = random_logits(2)
    before = logits.clone()
    mask = torch.ones(V, dtype=torch.bool)
    mask[0] = False
    rows = [
        make_row(gen(0), banned_ids=[1], output_ids=[2, 2], frequency_penalty=1.0),
        make_row(temperature=0.0, allowed_mask=mask, repetition_penalty=1.5),
    ]
    Sampler()(logits, rows, need_logprobs=True)
    assert torch.equal(logits, before)


# ---- penalties --------------------------------------------------------------------


def reference_penalties(
    logits: list[float], prompt: list[int], output: list[int], p: SamplingParams
) -> list[float]:
    """OpenAI frequency/presence penalties over the output, then the HF repetition
    penalty over prompt + output (negative logits multiplied, positive divided)."""
    out = list(logits)
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t in set(prompt) | set(output):
        out[t] = out[t] * p.repetition_penalty if out[t] < 0 else out[t] / p.repetition_penalty
    return out


PENALTY_CASES = {
    "frequency": dict(frequency_penalty=0.5),
    "presence": dict(presence_penalty=0.7),
    "negative frequency and presence": dict(frequency_penalty=-0.4, presence_penalty=-1.0),
    "repetition": dict(repetition_penalty=1.3),
    "repetition below one": dict(repetition_penalty=0.8),
    "all": dict(frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.5),
}


@pytest.mark.parametrize("kwargs", PENALTY_CASES.values(), ids=PENALTY_CASES.keys())
def test_apply_penalties_matches_the_reference(kwargs):
    logits = random_logits(1, seed=3)[0]
    prompt = [0, 1, 1, 5]
    output = [5, 7, 7, 7, 9]
    row = make_row(input_ids=prompt, output_ids=output, **kwargs)
    expected = reference_penalties(logits.tolist(), prompt, output, row.params)
    apply_penalties(logits, row)  # in place
    assert logits.tolist() == pytest.approx(expected, abs=1e-6)


def test_repetition_penalty_multiplies_negative_and_divides_positive_logits():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    apply_penalties(logits, make_row(input_ids=[0], output_ids=[1], repetition_penalty=2.0))
    assert logits.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_repetition_penalty_counts_a_token_once():
    logits = torch.tensor([3.0, 1.0])
    apply_penalties(logits, make_row(input_ids=[0, 0, 0], output_ids=[0], repetition_penalty=1.5))
    assert logits.tolist() == pytest.approx([2.0, 1.0])


def test_frequency_and_presence_penalties_ignore_the_prompt():
    logits = torch.zeros(4)
    row = make_row(
        input_ids=[0, 1, 2], output_ids=[3, 3], frequency_penalty=1.0, presence_penalty=0.5
    )
    apply_penalties(logits, row)
    assert logits.tolist() == [0.0, 0.0, 0.0, -2.5]


def test_penalties_change_what_greedy_picks():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    row = make_row(temperature=0.0, output_ids=[0, 0], frequency_penalty=1.0)
    assert Sampler()(logits, [row], need_logprobs=False).next_ids == [1]


# ---- filter_logits: temperature, top-k, top-p, min-p ------------------------------------


def test_filter_with_defaults_is_the_softmax():
    probs = filter_logits(LOGITS, SamplingParams())
    assert probs.tolist() == pytest.approx(PROBS)


def test_temperature_scales_the_logits_before_the_softmax():
    logits = torch.tensor([1.0, 2.0, 4.0])
    for t in (0.5, 2.0):
        probs = filter_logits(logits, SamplingParams(temperature=t))
        assert probs.tolist() == pytest.approx(torch.softmax(logits / t, -1).tolist())


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = torch.randperm(V, generator=gen(5)).float()  # distinct values
    probs = filter_logits(logits, SamplingParams(top_k=k))
    assert sorted(kept(probs)) == sorted(torch.topk(logits, k).indices.tolist())


@pytest.mark.parametrize("k", [-1, V, V + 5])
def test_top_k_disabled_or_at_least_vocab_keeps_all(k):
    probs = filter_logits(torch.randn(V, generator=gen(0)), SamplingParams(top_k=k))
    assert len(kept(probs)) == V


@pytest.mark.parametrize(
    "top_p,expected_kept",
    [
        (0.5, [0]),  # the first token alone reaches 0.5
        (0.51, [0, 1]),
        (0.8, [0, 1]),  # 0.5 + 0.3 reaches 0.8 exactly
        (0.81, [0, 1, 2]),
        (0.95, [0, 1, 2]),
        (0.96, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, expected_kept):
    probs = filter_logits(LOGITS, SamplingParams(top_p=top_p))
    assert kept(probs) == expected_kept


def test_top_p_keeps_the_most_likely_token_even_with_a_tiny_top_p():
    probs = filter_logits(LOGITS, SamplingParams(top_p=1e-6))
    assert kept(probs) == [0]


def test_top_p_works_on_unsorted_logits():
    order = [2, 0, 3, 1]  # PROBS shuffled: [0.15, 0.5, 0.05, 0.3]
    probs = filter_logits(LOGITS[order], SamplingParams(top_p=0.8))
    assert kept(probs) == [1, 3]


def test_top_p_acts_on_the_temperature_scaled_distribution():
    # At temperature 0.5 the probs are proportional to PROBS**2: [0.68, 0.25, ...].
    assert kept(filter_logits(LOGITS, SamplingParams(top_p=0.6))) == [0, 1]
    assert kept(filter_logits(LOGITS, SamplingParams(top_p=0.6, temperature=0.5))) == [0]


@pytest.mark.parametrize("min_p,expected_kept", [(0.2, [0, 1, 2]), (0.4, [0, 1]), (0.9, [0])])
def test_min_p_drops_tokens_below_min_p_times_the_max(min_p, expected_kept):
    # max prob 0.5: thresholds 0.1, 0.2, 0.45
    probs = filter_logits(LOGITS, SamplingParams(min_p=min_p))
    assert kept(probs) == expected_kept


def test_top_k_top_p_and_min_p_combine():
    logits = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]).log()
    # Each filter drops one more token:
    # top_k 5 drops token 5; top_p 0.9 over the renormalised top five
    # [0.417, 0.260, 0.156, 0.104, 0.063] drops token 4 (the mass before it is 0.94);
    # min_p 0.3 drops what is below 0.3 * 0.417 = 0.125: token 3.
    assert kept(filter_logits(logits, SamplingParams(top_k=5))) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, SamplingParams(top_k=5, top_p=0.9))) == [0, 1, 2, 3]
    p = SamplingParams(top_k=5, top_p=0.9, min_p=0.3)
    assert kept(filter_logits(logits, p)) == [0, 1, 2]


def test_filtered_probs_keep_their_ratios_and_renormalise_over_the_kept_set():
    probs = filter_logits(LOGITS, SamplingParams(top_p=0.8))
    # Not renormalised by filter_logits itself: multinomial normalises.
    assert probs.tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert (probs / probs.sum()).tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])


def test_draws_after_top_p_follow_the_renormalised_distribution():
    n = 8000
    g = gen(11)
    rows = [make_row(g, top_p=0.8) for _ in range(n)]
    ids = Sampler()(LOGITS.expand(n, -1), rows, need_logprobs=False).next_ids
    freq = [ids.count(t) / n for t in range(4)]
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0] == pytest.approx(0.625, abs=0.02)
    assert freq[1] == pytest.approx(0.375, abs=0.02)


# ---- seeded, batch-independent draws ----------------------------------------------------


def draw_sequence(seed: int, steps: int = 30) -> list[int]:
    g = gen(seed)
    logits = torch.zeros(1, V)  # uniform: the draws depend only on the generator
    return [Sampler()(logits, [make_row(g)], need_logprobs=False).next_ids[0] for _ in range(steps)]


def test_the_same_seed_gives_the_same_draws():
    assert draw_sequence(1234) == draw_sequence(1234)


def test_different_seeds_give_different_draws():
    assert draw_sequence(1) != draw_sequence(2)


def test_a_rows_draws_do_not_depend_on_its_neighbours():
    logits = random_logits(1, seed=7)[0] / 3  # a flat-ish distribution, many tokens likely

    def draws(neighbours: str) -> list[int]:
        g = gen(99)
        out = []
        for step in range(20):
            if neighbours == "none":
                batch, rows, i = logits.unsqueeze(0), [make_row(g)], 0
            elif neighbours == "sampling before":
                other = random_logits(2, seed=100 + step)
                batch = torch.stack([other[0], logits, other[1]])
                rows = [make_row(gen(step)), make_row(g), make_row(None, top_p=0.5)]
                i = 1
            else:  # greedy and penalised neighbours after it
                other = random_logits(2, seed=200 + step)
                batch = torch.stack([logits, other[0], other[1]])
                rows = [
                    make_row(g),
                    make_row(temperature=0.0),
                    make_row(gen(5), output_ids=[1, 2], presence_penalty=1.0, banned_ids=[0]),
                ]
                i = 0
            out.append(Sampler()(batch, rows, need_logprobs=True).next_ids[i])
        return out

    alone = draws("none")
    assert len(set(alone)) > 3
    assert draws("sampling before") == alone
    assert draws("greedy after") == alone


def test_empirical_frequencies_approach_the_softmax_at_temperature_one():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    expected = torch.softmax(logits, -1).tolist()
    n = 10000
    g = gen(2024)
    rows = [make_row(g, temperature=1.0) for _ in range(n)]
    ids = Sampler()(logits.expand(n, -1), rows, need_logprobs=False).next_ids
    freq = [ids.count(t) / n for t in range(len(expected))]
    assert freq == pytest.approx(expected, abs=0.015)


# ---- logprobs ---------------------------------------------------------------------------


def test_no_logprobs_unless_asked():
    out = Sampler()(random_logits(2), [make_row(temperature=0.0)] * 2, need_logprobs=False)
    assert out.logprobs is None
    assert out.top == [None, None]


def test_logprobs_are_the_log_softmax_of_the_raw_logits():
    logits = random_logits(3, seed=4)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[:4] = True
    rows = [
        make_row(temperature=0.0, banned_ids=[int(logits[0].argmax())]),
        make_row(gen(0), output_ids=[1, 1, 2], frequency_penalty=2.0, repetition_penalty=1.7),
        make_row(gen(1), temperature=0.3, top_k=2, top_p=0.5, allowed_mask=mask),
    ]
    out = Sampler()(logits, rows, need_logprobs=True)
    assert out.logprobs is not None
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, dim=-1))
    # Rows sum to one in probability space: nothing was masked out of them.
    torch.testing.assert_close(out.logprobs.exp().sum(-1), torch.ones(3))


def test_top_logprobs_for_the_rows_that_ask():
    logits = random_logits(2, seed=8)
    rows = [make_row(temperature=0.0, top_logprobs_num=3), make_row(temperature=0.0)]
    out = Sampler()(logits, rows, need_logprobs=True)
    ref = torch.log_softmax(logits[0], -1)
    vals, ids = out.top[0]
    assert ids == torch.topk(ref, 3).indices.tolist()
    assert vals == pytest.approx(torch.topk(ref, 3).values.tolist())
    assert vals == sorted(vals, reverse=True)
    assert out.top[1] is None


def test_top_logprobs_ignore_bans():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    row = make_row(temperature=0.0, banned_ids=[0], top_logprobs_num=2)
    out = Sampler()(logits, [row], need_logprobs=True)
    assert out.next_ids == [1]
    assert out.top[0][1] == [0, 1]
    assert out.top[0][0][0] == pytest.approx(math.log(torch.softmax(logits[0], -1)[0].item()))
