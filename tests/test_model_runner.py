"""The model runner owns its device state: it applies a ForwardBatch's table
writes, prepares attention and runs the model it built with its own kernel
ops and rotary tables."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.batch import ForwardBatch
from plait.runtime.config import ModelConfig
from plait.runtime.loader import load_config, load_state_dict, resolve_model
from plait.runtime.model_runner import ModelRunner

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runner(llama_dir) -> ModelRunner:
    source = resolve_model(llama_dir)
    cfg = ModelConfig.from_hf(load_config(source))
    return ModelRunner(
        cfg,
        load_state_dict(source, torch.float32),
        device=CPU,
        dtype=torch.float32,
        max_total_tokens=64,
        context_len=32,
        max_running_requests=2,
        attention_backend="torch",
    )


def i64(xs) -> torch.Tensor:
    return torch.tensor(list(xs), dtype=torch.int64)


def prefill(ids: list[int], row: int, slots: list[int], **extra) -> ForwardBatch:
    n = len(ids)
    return ForwardBatch(
        input_ids=i64(ids),
        positions=i64(range(n)),
        out_slots=i64(slots),
        req_rows=i64([row]),
        prefix_lens=[0],
        extend_lens=[n],
        logits_indices=i64(range(n)),
        write_rows=i64([row] * n),
        write_cols=i64(range(n)),
        write_slots=i64(slots),
        **extra,
    )


def test_the_rotary_tables_stay_fp32_outside_the_module_state(runner):
    assert runner.model.rotary.cos.dtype == torch.float32
    assert runner.model.rotary.cos.shape == (32, runner.cfg.head_dim)
    # The tables are not module state: casting the model would leave them alone.
    assert not any("rotary" in name for name, _ in runner.model.named_buffers())


def test_forward_writes_the_table_then_runs(runner):
    ids = [5, 9, 14, 3]
    logits = runner.forward(prefill(ids, 1, [11, 12, 13, 14]))
    assert logits.shape == (4, runner.cfg.vocab_size) and logits.dtype == torch.float32
    assert runner.req_to_token.table[1, :4].tolist() == [11, 12, 13, 14]
    # A decode step over a prefix lent in another row (prefix slots written by the batch).
    decode = ForwardBatch(
        input_ids=i64([7]),
        positions=i64([4]),
        out_slots=i64([20]),
        req_rows=i64([0]),
        prefix_lens=[4],
        extend_lens=[1],
        logits_indices=i64([0]),
        write_rows=i64([0] * 5),
        write_cols=i64(range(5)),
        write_slots=i64([11, 12, 13, 14, 20]),
    )
    step = runner.forward(decode)
    assert runner.req_to_token.table[0, :5].tolist() == [11, 12, 13, 14, 20]
    whole = runner.forward(prefill([*ids, 7], 1, [30, 31, 32, 33, 34]))
    torch.testing.assert_close(step[0], whole[-1], rtol=1e-4, atol=1e-4)


def test_input_embeds_replace_the_embedding_lookup(runner):
    ids = [5, 9, 14, 3]
    by_ids = runner.forward(prefill(ids, 0, [1, 2, 3, 4]))
    embeds = runner.model.embed_tokens(i64(ids))
    by_embeds = runner.forward(prefill(ids, 0, [5, 6, 7, 8], input_embeds=embeds))
    torch.testing.assert_close(by_embeds, by_ids)
    assert torch.equal(embeds, runner.model.embed_tokens(i64(ids)))  # not written in place
