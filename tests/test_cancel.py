"""The cancellation hook of the shared generation loop (`should_stop`), used by the server to free
the engine when a client goes away: polled once per round, it ends generation with the tokens
committed so far and finish_reason "cancelled"."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_hf

from specbranch.backend import NativeBackend
from specbranch.config import GenerationConfig, ModelConfig, SamplingConfig, SpeculationConfig
from specbranch.engines import ENGINE_CLASSES, AREngine, generate
from specbranch.models.decoder import Decoder, DecoderConfig


def native(model) -> NativeBackend:
    return NativeBackend(Decoder(DecoderConfig.from_hf(model.config.to_dict()), model.state_dict(), "fp64"), max_len=256)


@pytest.fixture(scope="module")
def models():
    return (make_tiny_hf("qwen2", seed=5, tie=True, vocab_size=64, dtype=torch.float64),
            make_tiny_hf("qwen2", seed=6, tie=True, vocab_size=64, num_hidden_layers=1, dtype=torch.float64))


def after(n: int):
    """A should_stop that says "stop" from its (n+1)-th call on, counting its calls."""
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > n

    return should_stop, calls


@pytest.mark.parametrize("name", ["ar", "specbranch"])
def test_should_stop_cancels_between_rounds(models, name):
    target, draft = models
    make = (lambda: AREngine(native(target))) if name == "ar" else (
        lambda: ENGINE_CLASSES[name](native(target), native(draft), SpeculationConfig(4, 3, 0.5)))
    gen = GenerationConfig(max_new_tokens=40)
    full = generate(make(), [3, 4, 5], gen, SamplingConfig())
    never, _ = after(10**9)
    assert generate(make(), [3, 4, 5], gen, SamplingConfig(), should_stop=never).tokens == full.tokens

    rounds = []
    stop, calls = after(3)
    got = generate(make(), [3, 4, 5], gen, SamplingConfig(), on_tokens=rounds.append, should_stop=stop)
    assert got.finish_reason == "cancelled"
    assert len(calls) == 4 and len(rounds) == 3  # polled once per round; the 4th poll stopped it
    assert got.tokens == full.tokens[: len(got.tokens)] and 3 <= len(got.tokens) < 40
    assert sum(rounds, []) == got.tokens

    stop0, _ = after(0)  # cancelled before the first round: nothing generated
    got0 = generate(make(), [3, 4, 5], gen, SamplingConfig(), should_stop=stop0)
    assert got0.tokens == [] and got0.finish_reason == "cancelled"


def test_pipeline_threads_on_tokens_and_should_stop(tiny_pair):
    from specbranch.pipeline import Pipeline

    pipe = Pipeline(ModelConfig(target=str(tiny_pair["target"]), draft=str(tiny_pair["draft"]), precision="fp32",
                                max_len=256, threads=1), progress=False)
    gen = GenerationConfig(max_new_tokens=20, chat_template=False, engine="specbranch")
    pieces = []
    full = pipe.generate("def add(a, b):", gen, on_tokens=pieces.append)
    assert sum(pieces, []) == full.tokens and full.finish_reason in ("length", "stop")
    stop, _ = after(1)
    got = pipe.generate("def add(a, b):", gen, should_stop=stop)
    assert got.finish_reason == "cancelled" and got.tokens == full.tokens[: len(got.tokens)]
    assert pipe.room(100) == 256 - 64 - 100
