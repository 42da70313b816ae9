"""Smoke test of scripts/fidelity_study.py (the package scripts/fidelity): its helpers, the command as the docs
show it, and a tiny study on 2 gloo ranks (exact > 60 dB)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    # As when the script runs: scripts/ on sys.path. Spawned ranks inherit it and import their worker functions.
    sys.path.insert(0, str(SCRIPTS))

from fidelity import markdown, metrics, plan, report  # noqa: E402
from fidelity.job import Job  # noqa: E402
from fidelity.main import run  # noqa: E402
from fidelity.samplers import TinySampler  # noqa: E402


def test_runs_parse_into_configurations() -> None:
    configs = plan.parse_runs(["4x32:exact,p0,p0.3,full,p0.3@w1,full@w2", "2,3x32,48:p0.3,full", "4x32:full"], warmup=4)
    labels = [c.mode.label for c in configs if (c.ranks, c.resolution) == (4, 32)]
    assert labels == ["exact", "partial 0 / w4", "partial 0.3 / w4", "full / w4", "partial 0.3 / w1", "full / w2"]
    cells = [(c.ranks, c.resolution) for c in configs]
    assert cells == sorted(cells)
    assert {cell: cells.count(cell) for cell in cells} == {(2, 32): 2, (2, 48): 2, (3, 32): 2, (3, 48): 2, (4, 32): 6}
    exact, p0 = configs[-6].mode, configs[-5].mode
    assert exact.convert_kwargs()["exact"] is True
    assert p0.convert_kwargs() == {
        "partial": 0.0, "warmup_steps": 4, "conditioning": plan.parse_mode("p0", 4).convert_kwargs()["conditioning"],
        "exact": False,
    }  # fmt: skip
    assert plan.parse_mode("full@w2", 4).convert_kwargs()["conditioning"].name == "FULL"
    for preset in plan.PLANS.values():
        assert plan.parse_runs(preset["runs"], preset["warmup"])
    with pytest.raises(ValueError, match="RANKSxSIZES"):
        plan.parse_runs(["4:p0.3"], warmup=4)
    with pytest.raises(ValueError, match="not one of"):
        plan.parse_mode("partial", 4)


def test_captions_are_deterministic_and_in_the_vocabulary() -> None:
    from pcpp.models import VOCABULARY

    captions = plan.study_captions(16, seed=3)
    assert captions == plan.study_captions(16, seed=3)
    assert len(set(captions)) > 8
    assert all(word in VOCABULARY for c in captions for word in c.split())


def test_summary_metrics_and_eps_conversion() -> None:
    s = metrics.summarize([10.0, 20.0, math.inf])
    assert s["n"] == 3
    assert s["n_inf"] == 1
    assert s["mean"] == pytest.approx(15.0)
    assert s["min"] == 10.0
    assert s["max"] == 20.0
    assert metrics.summarize([math.inf])["mean"] is None

    reference = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = metrics.image_metrics(reference.clone(), reference)
    assert same["psnr"] == [math.inf] * 3
    assert same["ssim"] == pytest.approx([1.0] * 3)
    noisy = metrics.image_metrics((reference + 0.01).clamp(0, 1), reference)
    assert all(30 < p < 45 for p in noisy["psnr"])

    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = 0.3
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
    torch.testing.assert_close(metrics.to_eps(v, x_t, a, "v_prediction"), eps)
    torch.testing.assert_close(metrics.to_eps(x0, x_t, a, "sample"), eps)
    assert metrics.relative_l2(eps, eps).abs().max() == 0


def test_tiny_sampler_matches_pcpp_models_sample() -> None:
    """The study's loop (per-prompt seeds) is pcpp.models.sample's loop."""
    from pcpp.models import sample

    job = Job("tiny", ("a red circle on a blue background",), (7,), 3, None, (), (), (), "")
    sampler = TinySampler(job, torch.device("cpu"))
    ours = sampler.generate([0], 32)
    theirs = sample(sampler.model, list(job.prompts), height=32, width=32, steps=3, seed=7)
    torch.testing.assert_close(ours, theirs)


def test_write_table_replaces_the_marked_block(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{markdown.TABLE_BEGIN}\nold\n{markdown.TABLE_END}\noutro\n")
    markdown.write_table(doc, "| new |\n")
    assert doc.read_text() == f"intro\n{markdown.TABLE_BEGIN}\n| new |\n{markdown.TABLE_END}\noutro\n"
    fresh = tmp_path / "fresh.md"
    markdown.write_table(fresh, "| t |\n")
    assert fresh.read_text() == "| t |\n"


@pytest.mark.slow  # a whole image or study: out of the quick loop
def test_small_study_on_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 gloo ranks, 4 prompts, 32 px, 4 steps, exact and partial 0.3 / warmup 2: exact is float rounding away
    from one device (> 60 dB; measured ~130 dB), the JSON has every part the docs read, and a second run with
    the same work folder reuses the finished configurations instead of spawning; ``--figures-only`` redraws the
    table and the image grid from that folder without touching the JSON, and refuses a folder without them."""
    out = tmp_path / "results.json"
    argv = [
        "--prompts", "4", "--steps", "4", "--run", "2x32:exact,p0.3@w2", "--eps-prompts", "2",
        "--reference-procs", "1", "--work-dir", str(tmp_path / "work"),
        "--json", str(out), "--table", str(tmp_path / "table.md"),
    ]  # fmt: skip
    document = run(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report.json_safe(document)))
    data: dict[str, Any] = json.loads(out.read_text())
    assert {"command", "wall_seconds", "environment", "plan", "benchmark_latency_ms", "prompts", "results"} <= set(data)
    assert data["environment"]["torch"] == torch.__version__
    assert len(data["prompts"]) == 4
    by_label = {r["mode"]["label"]: r for r in data["results"]}
    assert set(by_label) == {"exact", "partial 0.3 / w2"}
    for r in data["results"]:
        assert r["ranks"] == 2
        assert r["resolution"] == 32
        assert {"mean", "std", "min", "p5", "p95", "max", "n", "n_inf"} <= set(r["psnr"])
        assert len(r["per_image"]["psnr"]) == len(r["per_image"]["ssim"]) == 4
        assert len(r["eps"]["per_step_mean"]) == 4
        assert r["eps"]["images"] == [0, 1]
    exact = by_label["exact"]
    assert exact["psnr"]["n_inf"] == 4 or exact["psnr"]["min"] > 60, exact["psnr"]
    assert exact["eps"]["max"] < 1e-4
    partial = by_label["partial 0.3 / w2"]
    assert partial["eps"]["per_step_mean"][:2] == [None, None]  # warmup steps are not measured
    assert 10 < partial["psnr"]["mean"] < 60
    assert 0 < partial["eps"]["mean"] < 1
    assert data["command"] == "python scripts/fidelity_study.py " + " ".join(argv)
    table = (tmp_path / "table.md").read_text()
    assert "| 32 px | 2 | exact | " in table
    assert f"| 32 px | 2 | partial 0.3 / w2 | {partial['psnr']['mean']:.2f} ± " in table

    def no_spawn(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("cached configurations must not be run again")

    import pcpp.testing

    monkeypatch.setattr(pcpp.testing, "run_distributed", no_spawn)
    again = run(argv)
    assert again["results"] == document["results"]

    out.write_text("not rewritten by --figures-only")
    (tmp_path / "table.md").unlink()
    figures = run([*argv, "--figures-only", "--img-dir", str(tmp_path / "img")])
    assert figures["results"] == document["results"]
    assert out.read_text() == "not rewritten by --figures-only"
    assert (tmp_path / "table.md").read_text() == table
    from PIL import Image

    with Image.open(tmp_path / "img" / "fidelity_grid_32px.png") as grid:
        assert grid.format == "PNG"
        # 3 grid prompts, each an image row and a difference row; columns: 1 device, exact, partial 0.3.
        assert grid.height > grid.width > 0
    with pytest.raises(SystemExit, match="--figures-only: 2 configuration"):
        run([*argv, "--work-dir", str(tmp_path / "empty"), "--figures-only"])


def test_command_runs_as_the_docs_show() -> None:
    """``python scripts/fidelity_study.py`` (docs/fidelity.md) finds its package; a bad --run is one clear error."""
    root = SCRIPTS.parent
    command = [sys.executable, "scripts/fidelity_study.py"]
    shown = subprocess.run([*command, "--help"], cwd=root, capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "RANKSxSIZES:MODES" in shown.stdout
    assert "--figures-only" in shown.stdout
    bad = subprocess.run(
        [*command, "--run", "4:p0.3", "--prompts", "2"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode != 0
    last_line = bad.stderr.strip().splitlines()[-1]
    assert last_line.startswith("run '4:p0.3' is not of the form RANKSxSIZES:MODES"), bad.stderr
