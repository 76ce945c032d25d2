"""`captioner evaluate` end to end on the session's tiny `shapes` checkpoint (METEOR off for speed)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from captioner.cli import main
from captioner.evaluation import find_metrics_csv, read_curves

COCO_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")
GROUNDING_KEYS = ("attention_correctness", "pointing_game", "per_class", "object_precision",
                  "object_recall", "object_f1", "relation_accuracy")
FAKE_CSV = """epoch,step,train/loss,val/Bleu_4,val/CIDEr,val/exact_match
0,9,3.2,,,
0,9,,0.10,0.20,0.0
1,19,2.9,,,
1,19,,0.15,0.35,0.1
2,29,,0.18,0.41,0.1
"""


def _test_split(shapes_dir: Path) -> list[dict]:
    data = json.loads((shapes_dir / "dataset.json").read_text())
    return [im for im in data["images"] if im["split"] == "test"]


def _read(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoint, shapes_dir, tmp_path_factory) -> SimpleNamespace:
    """One checkpoint-mode run with --report, laid out like a real run (runs/X/checkpoints, logs)."""
    root = tmp_path_factory.mktemp("evaluate")
    ckpt = root / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, ckpt)
    csv = root / "run" / "logs" / "version_0" / "metrics.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text(FAKE_CSV)
    cfg = root / "shapes.yaml"
    # eval_batch_size 3: the 8 test images go through several batches, the last one short
    cfg.write_text(f"trainer:\n  max_epochs: 1\ndata:\n  dataset: shapes\n  shapes: {{data_dir: {shapes_dir}, image_size: 32}}\n"
                   "  min_count: 1\n  eval_batch_size: 3\n  num_workers: 0\n")
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["evaluate", "--checkpoint", str(ckpt), "--config", str(cfg), "--split", "test",
                   "--model.decoding.beam_size", "2", "--device", "cpu", "--no-meteor",
                   "--output", str(out / "metrics.json"), "--results", str(out / "results.json"),
                   "--report", str(out / "report")])
    return SimpleNamespace(rc=rc, stdout=stdout.getvalue(), out=out, ckpt=ckpt, csv=csv)


def test_checkpoint_mode_writes_metrics_and_results(evaluated, shapes_dir):
    assert evaluated.rc == 0
    test = _test_split(shapes_dir)
    metrics = _read(evaluated.out / "metrics.json")
    for key in COCO_KEYS:
        assert 0.0 <= metrics[key] <= 10.0, key
    assert "METEOR" not in metrics and "METEOR" in metrics["skipped"]
    assert metrics["tokenizer"] in ("ptb", "python")
    assert 0.0 <= metrics["nltk_corpus_bleu4"] <= 1.0 and "nltk" in metrics["nltk_corpus_bleu4_note"]
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert metrics["num_images"] == len(test)
    assert metrics["beam_size"] == 2 and metrics["split"] == "test"
    assert metrics["checkpoint"] == str(evaluated.ckpt)
    # shapes has grounding: attention correctness and friends are in the same file
    for key in GROUNDING_KEYS:
        assert key in metrics, key
    assert set(metrics["per_class"]) == {"colour", "size", "shape"}

    # one result per test image, each image once, ids are the data set's (imgid: no cocoid here)
    results = _read(evaluated.out / "results.json")
    assert [r["image_id"] for r in results] == [im["imgid"] for im in test]
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)

    assert "BLEU-4" in evaluated.stdout and "CIDEr" in evaluated.stdout
    assert "BLEU-4 (nltk)" in evaluated.stdout
    assert "attention correctness" in evaluated.stdout and "pointing game" in evaluated.stdout


def test_report_has_summary_curves_and_attention_figures(evaluated):
    report = evaluated.out / "report"
    names = {p.name for p in report.iterdir()}
    expected = {"metrics.json", "per_image.json", "summary.md", "curves.png",
                *(f"attention_{kind}_{i}.png" for kind in ("best", "worst") for i in (1, 2, 3))}
    assert expected <= names
    for name in expected:
        if name.endswith(".png"):
            assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert _read(report / "metrics.json") == _read(evaluated.out / "metrics.json")
    per_image = _read(report / "per_image.json")
    assert [p["CIDEr"] for p in per_image] == sorted((p["CIDEr"] for p in per_image), reverse=True)

    summary = (report / "summary.md").read_text()
    for heading in ("## Caption metrics", "## Attention grounding", "## Settings",
                    "## Best 5 images", "## Worst 5 images", "## Attention maps"):
        assert heading in summary, heading
    assert "](curves.png)" in summary and str(evaluated.csv) in summary  # found above the checkpoint
    assert "](attention_worst_3.png)" in summary
    best_caption = per_image[0]["caption"] or "(empty)"
    assert best_caption in summary


def test_predictions_mode_scores_equal_checkpoint_mode(evaluated, shapes_dir, tmp_path, capsys):
    rc = main(["evaluate", "--predictions", str(evaluated.out / "results.json"),
               "--references", str(shapes_dir / "dataset.json"), "--split", "test", "--no-meteor",
               "--output", str(tmp_path / "m.json"), "--report", str(tmp_path / "report")])
    assert rc == 0, capsys.readouterr().err
    ours, theirs = _read(tmp_path / "m.json"), _read(evaluated.out / "metrics.json")
    for key in (*COCO_KEYS, "nltk_corpus_bleu4", "exact_match", "num_images"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-12), key
    assert ours["tokenizer"] == theirs["tokenizer"]
    assert ours["mode"] == "predictions" and "attention_correctness" not in ours
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "No training logs found" in summary and "No attention maps" in summary
    assert "BLEU-4" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs Java")
def test_scores_equal_cocoevalcap_on_the_same_results_file(evaluated, shapes_dir, tmp_path,
                                                         monkeypatch, capsys):
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    test = _test_split(shapes_dir)
    ann = {"info": {}, "licenses": [], "type": "captions",
           "images": [{"id": im["imgid"], "file_name": im["filename"]} for im in test],
           "annotations": [{"image_id": im["imgid"], "id": s["sentid"], "caption": s["raw"]}
                           for im in test for s in im["sentences"]]}
    ann_file = tmp_path / "captions_test.json"
    ann_file.write_text(json.dumps(ann))
    results = evaluated.out / "results.json"

    rc = main(["evaluate", "--predictions", str(results), "--coco-annotations", str(ann_file),
               "--no-meteor", "--output", str(tmp_path / "m.json")])
    assert rc == 0, capsys.readouterr().err
    ours = _read(tmp_path / "m.json")
    assert ours["tokenizer"] == "ptb"

    class Off:  # METEOR and SPICE are not part of this comparison (slow JVMs, downloads)
        def method(self):
            return "off"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Meteor", Off)
    monkeypatch.setattr(coco_eval, "Spice", Off)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools/pycocoevalcap print progress
        coco = COCO(str(ann_file))
        scorer = coco_eval.COCOEvalCap(coco, coco.loadRes(str(results)))
        scorer.evaluate()
    for key in COCO_KEYS:
        assert ours[key] == pytest.approx(scorer.eval[key], abs=1e-9), key


def test_id_mismatch_is_reported_or_scored_on_the_intersection(evaluated, shapes_dir, tmp_path, capsys):
    results = _read(evaluated.out / "results.json")
    dropped = results[0]["image_id"]
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps([*results[1:], {"image_id": 999999, "caption": "a red circle"}]))
    args = ["evaluate", "--predictions", str(bad), "--references", str(shapes_dir / "dataset.json"),
            "--no-meteor"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"1 of {len(results)} reference image ids have no prediction (e.g. {dropped})" in err
    assert "1 of" in err and "999999" in err and "--allow-missing" in err

    assert main([*args, "--allow-missing", "--output", str(tmp_path / "m.json")]) == 0
    metrics = _read(tmp_path / "m.json")
    assert metrics["num_images"] == len(results) - 1
    assert metrics["missing_predictions"] == 1 and metrics["extra_predictions"] == 1


@pytest.mark.parametrize(("content", "message"), [
    ("[{\"image_id\": 1, ", "not valid JSON"),
    ('{"1": "a red circle"}', "got a JSON object"),
    ("[]", "empty"),
    ('[{"caption": "a red circle"}]', "entry [0]: missing field 'image_id'"),
    ('[{"image_id": "5", "caption": "a"}]', "entry [0]: field 'image_id' must be an integer"),
    ('[{"image_id": 5, "caption": ["a"]}]', "entry [0]: field 'caption' must be a string"),
    ('[{"image_id": 5, "caption": "a"}, {"image_id": 5, "caption": "b"}]', "entry [1]: image_id 5"),
])
def test_malformed_results_exit_2(content, message, shapes_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc = main(["evaluate", "--predictions", str(bad), "--references", str(shapes_dir / "dataset.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(bad) in err and message in err, err


@pytest.mark.parametrize("args", [
    [],
    ["--checkpoint", "x.ckpt"],
    ["--predictions", "r.json"],
    ["--predictions", "r.json", "--references", "d.json", "--beam-size", "3"],
    ["--predictions", "r.json", "--references", "d.json", "--quantize", "int8"],
    ["--predictions", "missing.json", "--references", "d.json"],
])
def test_usage_errors_exit_2(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", *args]) == 2
    assert capsys.readouterr().err.startswith("captioner: error:")


def test_metrics_csv_is_found_above_the_checkpoint_and_read(tmp_path):
    run = tmp_path / "runs" / "x"
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    assert find_metrics_csv(ckpt) is None
    csv = run / "logs" / "version_1" / "metrics.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text(FAKE_CSV)
    assert find_metrics_csv(ckpt) == csv.resolve()
    assert find_metrics_csv(None, run / "logs") == csv and find_metrics_csv(None, csv) == csv
    x, curves = read_curves(csv)
    assert x == "epoch"
    assert curves["val/CIDEr"] == [(0.0, 0.20), (1.0, 0.35), (2.0, 0.41)]
    assert curves["val/Bleu_4"][-1] == (2.0, 0.18)
