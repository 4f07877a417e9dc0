"""How ``select`` turns the model's logprobs of each choice into a decision.

Each method gets, per choice, the logprobs of the choice's tokens after the
prompt (``token_logprobs[i]``) and, for the unconditional method, of the same
tokens with no prompt; it returns the index it picks and what it computed.

* ``token_length_normalized`` (default): the highest mean token logprob.
* ``greedy_token_selection``: compare token by token, keeping the choices tied
  at the best logprob of each position (a shorter choice is padded with its own
  mean), until one is left.
* ``unconditional_likelihood_normalized``: the highest mean of
  ``conditional - unconditional`` token logprobs, which discounts choices that
  are likely whatever the prompt says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChoiceScores:
    index: int
    meta_info: dict[str, Any]


class ChoicesMethod:
    name = "base"
    needs_unconditional = False

    def __call__(
        self,
        token_logprobs: list[list[float]],
        unconditional: list[list[float]] | None = None,
    ) -> ChoiceScores:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


class TokenLengthNormalized(ChoicesMethod):
    name = "token_length_normalized"

    def __call__(self, token_logprobs, unconditional=None) -> ChoiceScores:
        normalized = [_mean(lps) for lps in token_logprobs]
        return ChoiceScores(_argmax(normalized), {"normalized_prompt_logprobs": normalized})


class GreedyTokenSelection(ChoicesMethod):
    name = "greedy_token_selection"

    def __call__(self, token_logprobs, unconditional=None) -> ChoiceScores:
        width = max(len(lps) for lps in token_logprobs)
        matrix = [lps + [_mean(lps)] * (width - len(lps)) for lps in token_logprobs]
        alive = list(range(len(matrix)))
        for col in range(width):
            best = max(matrix[i][col] for i in alive)
            alive = [i for i in alive if matrix[i][col] == best]
            if len(alive) == 1:
                break
        normalized = [_mean(lps) for lps in token_logprobs]
        return ChoiceScores(
            alive[0], {"normalized_prompt_logprobs": normalized, "greedy_logprob_matrix": matrix}
        )


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    name = "unconditional_likelihood_normalized"
    needs_unconditional = True

    def __call__(self, token_logprobs, unconditional=None) -> ChoiceScores:
        if unconditional is None:
            raise ValueError(f"{self.name} needs the unconditional logprobs")
        normalized = [
            _mean([c - u for c, u in zip(cond, uncond)])
            for cond, uncond in zip(token_logprobs, unconditional)
        ]
        return ChoiceScores(
            _argmax(normalized),
            {
                "normalized_prompt_logprobs": [_mean(lps) for lps in token_logprobs],
                "normalized_unconditional_prompt_logprobs": normalized,
                "unconditional_token_logprobs": unconditional,
            },
        )


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()

METHODS = {
    m.name: m
    for m in (token_length_normalized, greedy_token_selection, unconditional_likelihood_normalized)
}


def resolve_method(method: ChoicesMethod | str | None) -> ChoicesMethod:
    if method is None:
        return token_length_normalized
    if isinstance(method, ChoicesMethod):
        return method
    if method in METHODS:
        return METHODS[method]
    raise ValueError(f"choices_method={method!r}: known methods are {sorted(METHODS)}")
