"""`matrixinfer-sim`'s command line: vLLM's own flag names, durations, --version, --log-level."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from sim.cli import build_config, serve_parser
from tests.sim.conftest import SimFactory


def _config(*args: str):  # type: ignore[no-untyped-def]
    return build_config(serve_parser().parse_args(list(args)))


def test_vllm_flag_names_are_accepted() -> None:
    cfg = _config(
        "--served-model-name", "llama-8b", "--num-gpu-blocks-override", "1234",
        "--max-model-len", "4096", "--lora-modules", "a=/adapters/a",
        '{"name": "b", "path": "/adapters/b", "base_model_name": "meta-llama/Llama-3.1-8B"}',
    )  # fmt: skip
    assert cfg.model == "llama-8b"
    assert cfg.engine.num_gpu_blocks == 1234
    assert cfg.lora_modules == {"a": "/adapters/a", "b": "/adapters/b"}
    assert _config("--model", "m").model == "m"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("noequals", "NAME=PATH"),
        ('{"name": "b"', "invalid JSON"),
        ('{"name": "b", "path": "/p", "rank": 8}', "unknown keys ['rank']"),
        ('{"name": "", "path": "/p"}', '"name" and "path"'),
    ],
)
def test_bad_lora_modules_are_named(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        serve_parser().parse_args(["--lora-modules", value])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_one_served_model_name() -> None:
    with pytest.raises(SystemExit, match="serves one name"):
        _config("--served-model-name", "a", "b")


def test_durations_in_the_flags_form(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config("--slow-start", "1500ms", "--step-base", "20ms", "--decode-per-seq", "0.0001")
    assert cfg.slow_start == 1.5
    assert cfg.engine.timing.step_base == pytest.approx(0.02)
    assert cfg.engine.timing.decode_per_seq == pytest.approx(1e-4)
    defaults = _config()
    assert defaults.engine.timing.prefill_per_token == pytest.approx(6.8e-5)  # "68us"
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--slow-start", "3 parsecs"])
    assert "invalid duration '3 parsecs'" in capsys.readouterr().err


def test_version_and_log_level() -> None:
    from fleet.service import version

    done = subprocess.run(
        [sys.executable, "-m", "sim", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.split() == ["matrixinfer-sim", version()]
    done = subprocess.run(
        [sys.executable, "-m", "sim", "--log-level", "loud"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "'loud'" in done.stderr and "debug" in done.stderr
    assert serve_parser().parse_args(["--log-level", "DEBUG"]).log_level == "debug"


def test_served_model_name_is_what_the_api_serves(sim_factory: SimFactory) -> None:
    """A script written for vLLM: the served name and a JSON adapter are on /v1/models."""
    adapter = json.dumps({"name": "ad", "path": "/adapters/ad", "base_model_name": "base"})
    with (
        sim_factory(
            "--served-model-name", "served", "--lora-modules", adapter, "--time-scale", "0.05"
        ) as pod,
        urllib.request.urlopen(f"{pod.url}/v1/models", timeout=10) as resp,
    ):
        ids = [m["id"] for m in json.loads(resp.read())["data"]]
    assert ids == ["served", "ad"]
