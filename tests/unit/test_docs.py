"""The documentation matches the code: docs/configuration.md is what
tools/gen_config_docs.py generates from the option declarations now, and the Markdown files
outside docs/ (which `mkdocs build --strict` does not check) link to files that exist."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "tools" / "gen_config_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_the_declarations():
    fresh = _generator().render()
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert fresh == committed, "docs/configuration.md is stale: run tools/gen_config_docs.py"


def test_configuration_reference_lists_every_option():
    from mtckpt import config
    from mtckpt.daemon import config as daemon_config

    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in config.MANAGER_OPTIONS:
        assert f"| `{name}` |" in text and f"`MTCKPT_{name.upper()}`" in text, name
    for tier, cls in config.TIER_CLASSES.items():
        assert f"### `[{tier}]`" in text, tier
        section = text.split(f"### `[{tier}]`")[1].split("\n## ")[0].split("\n### ")[0]
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in section, f"{tier}.{field.name}"
    for key in daemon_config.DAEMON_OPTIONS:
        flag = "--" + key.replace("_", "-")
        assert f"| `{flag}` | `{key}` | `MTCKPT_DAEMON_{key.upper()}`" in text, key


@pytest.mark.parametrize("page", ["README.md", "integrations/kubernetes/README.md"])
def test_relative_links_outside_docs_resolve(page):
    path = ROOT / page
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    local = [link for link in links if "://" not in link]
    assert local, f"{page} links to nothing"
    missing = [link for link in local if not (path.parent / link).exists()]
    assert not missing, f"{page} links to missing files: {missing}"


def test_readme_starts_with_the_commands_for_a_fresh_machine():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:3] == ["# mtckpt", "", "```bash"]
    assert lines[3].endswith("python examples/train_resume.py   # main job"), lines[3]
    assert lines[4].startswith("bash .ci/run "), lines[4]
    assert lines[5] == "```"


def test_the_numpy_shard_reader_in_the_format_page_reads_bfloat16_and_float8(tmp_path):
    import ml_dtypes
    import numpy as np
    import torch

    import mtckpt

    state = {"model": {"layers": {"0": {"attn/qkv": torch.randn(4, 6, dtype=torch.bfloat16)}}},
             "scale": torch.tensor([0.5, 2.0]).to(torch.float8_e4m3fn),
             "step": torch.arange(3, dtype=torch.int64)}  # fmt: skip
    with mtckpt.CheckpointManager("doc", memory=mtckpt.MemoryTier(str(tmp_path))) as mgr:
        mgr.save(1000, state).wait()
    shard = tmp_path / "doc" / "step-000000001000" / "rank-00000.safetensors"
    page = (ROOT / "docs" / "format.md").read_text()
    (code,) = re.findall(r"Reading a shard without mtckpt.*?```python\n(.*?)```", page, re.S)
    code = code.replace('"step-000000001000/rank-00000.safetensors"', repr(str(shard)))
    namespace: dict = {}
    exec(compile(code, "docs/format.md", "exec"), namespace)
    tensors = namespace["tensors"]
    qkv = tensors["model/layers/0/attn~1qkv"]
    assert qkv.dtype == ml_dtypes.bfloat16
    expected = state["model"]["layers"]["0"]["attn/qkv"].float().numpy()
    assert np.array_equal(qkv.astype(np.float32), expected)
    assert tensors["scale"].dtype == ml_dtypes.float8_e4m3fn
    assert tensors["scale"].astype(np.float32).tolist() == [0.5, 2.0]
    assert tensors["step"].tolist() == [0, 1, 2]
