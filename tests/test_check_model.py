"""`acs check-model`: the preflight passes on the tiny model of every family and fails, with the
right check named and no stack trace, on a hub id without network, a directory that is not a
model, and checkpoints broken one file at a time."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.check_model import SCENE, check_model, estimate_memory
from pipeline.models.tiny import FAMILY_SHAPES

N, B = 2, 4  # small: the query runs for real, N + 1 = 3 candidates
CHECKS = ["load", "family", "processor", "chat_template", "special_tokens", "box_round_trip", "query", "memory"]
REPO = Path(__file__).resolve().parent.parent


def _cli(argv, capfd):
    from jobs.cli import main

    code = main(["check-model", *argv])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def report(family_dir):
    return check_model(str(family_dir), num_candidates=N, batch_size=B, device="cpu")


@pytest.fixture(scope="module")
def scene_box():
    from pipeline.organism.scenes import make_scene

    category, obj = make_scene(*SCENE).queries()[0]
    x, y, w, h = obj.bbox
    return category, (x, y, x + w, y + h)


def test_every_check_passes(family, report, scene_box):
    assert [c.name for c in report.checks] == CHECKS
    # Random weights write no box: the query may warn, never fail; everything else is ok.
    assert [c.status for c in report.checks if c.name != "query"] == ["ok"] * (len(CHECKS) - 1)
    assert report.check("query").status in ("ok", "warn")
    assert report.exit_code == 0 and not report.failed
    assert report.family == family == report.check("family").data["family"]
    assert report.verdict().startswith(f"check-model: OK {family}, ")
    assert report.device == "cpu" and report.dtype == "float32"
    assert report.parameter_bytes >= 4 * report.num_parameters > 0


def test_box_round_trip_gives_the_box_back(family, report, scene_box):
    d = report.check("box_round_trip").data
    assert d["box"] == list(scene_box[1])
    assert d["parsed"] == d["written"]  # the integers the family writes, read back by the parser
    assert all(float(v).is_integer() for v in d["written"])
    assert max(abs(a - b) for a, b in zip(d["box_back"], d["box"])) <= 1.0
    assert d["decoded"] == d["text"] and scene_box[0] in d["text"]
    assert d["coord_tokens"] == [1, 1, 1, 1]  # the tiny tokenizer: one token per integer
    if family == "qwen2.5-vl":  # absolute pixels of an input the scene needs no resize for
        assert d["input_size"] == d["orig_size"] == [252, 336] and d["written"] == d["box"]


def test_query_ran_through_the_label_path(report, scene_box):
    d = report.check("query").data
    assert d["candidates"] == d["candidate_rows"] == N + 1
    assert d["status"] in ("ok", "no_box") and d["selector"] == "acs-free"
    assert d["seconds"] > 0 and d["generated_tokens"] > 0
    text, _ = FAMILY_SHAPES[report.family]["tiny"]  # capture on, over every layer and head
    assert d["captured_layers"] == list(range(text["num_hidden_layers"]))
    assert d["captured_heads"] == list(range(text["num_attention_heads"]))
    assert {"greedy", "vote", "oracle"} <= set(d["scores"])  # the scene's box came along as ground truth
    assert (report.check("query").status == "ok") == (d["with_box"] > 0)


def test_memory_estimate(family, report):
    mem = report.memory
    inputs = mem["inputs"]
    text, _ = FAMILY_SHAPES[family]["tiny"]
    assert (inputs["layers"], inputs["heads"], inputs["kv_heads"]) == (
        text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"])
    assert inputs["head_dim"] == text["hidden_size"] // text["num_attention_heads"] and inputs["dtype_bytes"] == 4
    assert (inputs["num_candidates"], inputs["batch_size"]) == (N, B)
    assert inputs["visual_tokens"] == report.check("processor").data["max_visual_tokens"]
    assert mem["total_bytes"] == estimate_memory(**inputs)["total_bytes"] > report.parameter_bytes
    assert mem["terms"]["weights"] == report.parameter_bytes
    assert mem["terms"]["kv_cache"] > 0 and mem["terms"]["capture"] > 0
    # the bound is the processor's largest image; the scene (no larger) needs no more
    assert mem["scene_batch_bytes"] <= mem["total_bytes"]
    assert (mem["scene_batch_bytes"] < mem["total_bytes"]) == (inputs["visual_tokens"] > report.check(
        "chat_template").data["visual_tokens"])

    def total(**kw):
        return estimate_memory(**{**inputs, **kw})["total_bytes"]

    assert total(num_candidates=N + 8) > total(num_candidates=N) > total(num_candidates=0)
    assert total(batch_size=2 * B) > total(batch_size=B) > total(batch_size=1)
    # everything but the weights scales with the batch
    assert total(batch_size=2 * B) - report.parameter_bytes == 2 * (total(batch_size=B) - report.parameter_bytes)
    assert isinstance(mem["measured_query_bytes"], int) and mem["measured_method"] == "sampled RSS"


def test_cli_prints_a_line_per_check_and_the_verdict(family, family_dir, capfd):
    code, out, _ = _cli([str(family_dir), "--num-candidates", "1", "--batch-size", "2", "--device", "cpu"], capfd)
    lines = out.strip().splitlines()
    assert code == 0
    assert [line.split()[1] for line in lines[:-1]] == CHECKS
    assert lines[-1].startswith(f"check-model: OK {family}, ") and "per batch of 2 x 2 candidates" in lines[-1]


def test_cli_json(tiny_model_dir, capfd):
    code, out, _ = _cli([str(tiny_model_dir), "--num-candidates", "1", "--device", "cpu", "--json"], capfd)
    d = json.loads(out)
    assert code == d["exit_code"] == 0
    assert d["family"] == "qwen2.5-vl" and [c["name"] for c in d["checks"]] == CHECKS
    assert d["verdict"].startswith("check-model: OK qwen2.5-vl") and d["memory"]["total_bytes"] > 0


def test_hub_id_without_network_says_what_to_do(tmp_path):
    """The console entry in a fresh process, offline with an empty cache: exit 1, advice, no traceback."""
    model = "Qwen/Qwen2.5-VL-7B-Instruct-does-not-exist"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "check-model", model], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    load = next(line for line in p.stdout.splitlines() if line.split()[1:2] == ["load"])
    assert load.startswith("FAIL")
    assert "pass a local directory" in load and f"hf download {model}" in load
    assert f"huggingface-cli download {model}" in load and "HF_HOME" in load
    assert str(tmp_path / "hf") in load  # names the cache it looked in
    assert p.stdout.strip().splitlines()[-1] == "check-model: FAIL (load)"


@pytest.mark.parametrize("layout", ["not-a-model", "bin-weights"])
def test_directory_that_is_not_a_model(layout, tiny_model_dir, tmp_path, capfd):
    d = tmp_path / layout
    if layout == "not-a-model":
        d.mkdir()
        (d / "notes.txt").write_text("not a checkpoint")
        missing = ["config.json", "*.safetensors", "tokenizer.json", "processor_config.json"]
    else:  # a checkpoint whose weights are pickles, which load_adapter refuses
        shutil.copytree(tiny_model_dir, d)
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
        missing = ["*.safetensors", "found *.bin"]
    code, out, _ = _cli([str(d)], capfd)
    lines = out.strip().splitlines()
    assert code == 1 and lines[-1] == "check-model: FAIL (load)"
    assert lines[0].startswith("FAIL") and f"{d} is not a model directory" in lines[0]
    assert all(m in lines[0] for m in missing)
    if layout == "bin-weights":
        assert "config.json" not in lines[0]
    assert all(line.startswith("SKIP") and line.endswith("not run: load failed") for line in lines[1:-1])


def _break(src: Path, dst: Path, breakage: str) -> None:
    shutil.copytree(src, dst)
    if breakage == "no-chat-template":
        for name in ("chat_template.jinja", "chat_template.json"):
            (dst / name).unlink(missing_ok=True)
        for name in ("tokenizer_config.json", "processor_config.json"):
            cfg = json.loads((dst / name).read_text())
            cfg.pop("chat_template", None)
            (dst / name).write_text(json.dumps(cfg))
    else:  # the config points the model at another token than the processor writes for the image
        cfg = json.loads((dst / "config.json").read_text())
        cfg["image_token_id"] += 1
        (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breakage, failing", [("no-chat-template", "chat_template"),
                                               ("image-token-id", "special_tokens")])
def test_broken_checkpoint_fails_its_check(family_dir, tmp_path, breakage, failing):
    d = tmp_path / "broken"
    _break(Path(family_dir), d, breakage)
    r = check_model(str(d), num_candidates=1, batch_size=1, device="cpu")
    status = {c.name: c.status for c in r.checks}
    assert r.exit_code == 1 and r.verdict() == f"check-model: FAIL ({failing})"
    assert [c.name for c in r.failed] == [failing]
    assert status["load"] == status["family"] == status["processor"] == "ok"
    assert status["query"] == "skip" and r.check("query").detail == f"not run: {failing} failed"
    detail = r.check(failing).detail
    if breakage == "no-chat-template":
        assert "no chat template" in detail and status["special_tokens"] == "ok"
    else:
        want = json.loads((Path(family_dir) / "config.json").read_text())["image_token_id"]
        assert f"config image_token_id={want + 1} but the tokenizer's" in detail and f"is {want}" in detail
        assert status["chat_template"] == "ok"


def test_usage_errors(tiny_model_dir, capfd):
    code, _, err = _cli([str(tiny_model_dir), "--batch-size", "0"], capfd)
    assert code == 2 and "batch size must be >= 1" in err
    code, _, err = _cli([str(tiny_model_dir), "--num-candidates", "-1"], capfd)
    assert code == 2 and "num_candidates must be >= 0" in err
    with pytest.raises(SystemExit) as e:  # argparse: no MODEL
        _cli([], capfd)
    assert e.value.code == 2
