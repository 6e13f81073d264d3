"""Engine options are declared once (hawker/options.py): the CLI's flags, --help and LLM(...) follow the fields."""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stdout

import pytest

from hawker import cli
from hawker.options import EngineOptions, option

SUBCOMMANDS_WITH_ENGINE_FLAGS = (["serve"], ["prepare"], ["generate"], ["chat"], ["bench", "throughput"])


def help_text(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        cli.build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("argv", SUBCOMMANDS_WITH_ENGINE_FLAGS, ids=lambda argv: "-".join(argv))
def test_every_option_has_a_flag_with_its_help(argv: list[str]) -> None:
    text = " ".join(help_text(argv).split())
    for spec in dataclasses.fields(EngineOptions):
        if spec.name == "model":
            continue
        assert "--" + spec.name.replace("_", "-") in text, spec.name
        first_words = " ".join(spec.metadata["help"].split()[:4])
        assert first_words in text, f"{spec.name}'s help is not in --help"


def test_flags_parse_into_the_options_defaults_and_values() -> None:
    args = cli.build_parser().parse_args(["generate", "hi"])
    assert EngineOptions(**cli._engine_kwargs(args)) == EngineOptions()
    argv = ["generate", "hi", "--kv-cache-dtype", "fp8", "-tp", "2", "--no-prefix-caching", "--no-packed-matmul"]
    options = EngineOptions(**cli._engine_kwargs(cli.build_parser().parse_args(argv)))
    assert options.kv_cache_dtype == "fp8" and options.tensor_parallel_size == 2
    assert options.enable_prefix_caching is False and options.packed_matmul is False


def test_a_choice_outside_the_declared_ones_is_refused_everywhere() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineOptions(kv_cache_dtype="int3")
    with redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "hi", "--kv-cache-dtype", "int3"])


def test_a_new_field_is_a_new_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding an option is one field: the CLI picks it up with its help, type and choices."""

    @dataclasses.dataclass(frozen=True)
    class Extended(EngineOptions):
        draft_tokens: int = option(0, "tokens a draft model proposes per step; 0 = off")
        draft_mode: str = option("off", "how drafts are made", choices=("off", "ngram"))

    types = cli.option_types()
    monkeypatch.setattr(cli, "EngineOptions", Extended)
    monkeypatch.setattr(cli, "option_types", lambda: {**types, "draft_tokens": int, "draft_mode": str})
    text = " ".join(help_text(["serve"]).split())
    assert "--draft-tokens" in text and "tokens a draft model proposes per step" in text
    args = cli.build_parser().parse_args(["generate", "hi", "--draft-tokens", "4", "--draft-mode", "ngram"])
    extended = Extended(**cli._engine_kwargs(args))
    assert extended.draft_tokens == 4 and extended.draft_mode == "ngram"


def test_the_cpu_kv_cache_budget_comes_from_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from hawker.engine.configure import CPU_KV_CACHE_ENV, DEFAULT_CPU_KV_CACHE_GB, cpu_kv_cache_gb

    monkeypatch.delenv(CPU_KV_CACHE_ENV, raising=False)
    assert cpu_kv_cache_gb() == DEFAULT_CPU_KV_CACHE_GB
    monkeypatch.setenv(CPU_KV_CACHE_ENV, "0.5")
    assert cpu_kv_cache_gb() == 0.5
    for bad in ("lots", "0", "-1"):
        monkeypatch.setenv(CPU_KV_CACHE_ENV, bad)
        with pytest.raises(ValueError, match=CPU_KV_CACHE_ENV):
            cpu_kv_cache_gb()
