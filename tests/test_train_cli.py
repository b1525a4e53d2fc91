import json

import pytest

from iqa_ray.cli.train import build_parser, main


def args_for(tiny_dataset, out, *extra):
    return ["--dataset", str(tiny_dataset.path), "--family", "mlp", "--crop-size", "48", "--batch-size", "8",
            "--set", "hidden_dim=16", "--set", "eval_batch_size=32", "--out", str(out), "--threads", "1", *extra]


def test_help_documents_every_option():
    text = build_parser().format_help()
    for option in ("--family", "--backbone", "--dataset", "--epochs", "--lr", "--scheduler", "--alpha",
                   "--margin", "--n-clusters", "--frozen-backbone", "--multiscale", "--set", "--resume",
                   "--eval-on", "--out"):
        assert option in text


def test_standalone_run_writes_its_folder_and_resumes(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args_for(tiny_dataset, out, "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    assert "best epoch 1: val SRCC" in printed and "test (selected model): SRCC" in printed
    assert "tensorboard --logdir" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["model"]["family"] == "mlp" and config["git_revision"]
    assert list(out.glob("events.out.tfevents.*"))
    assert (out / "checkpoint.pt").exists() and (out / "best.pt").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "val_srcc" in json.loads(lines[0])

    # resuming a finished run keeps its epochs and result; another config is refused
    assert main(args_for(tiny_dataset, out, "--epochs", "1", "--resume")) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(args_for(tiny_dataset, out, "--epochs", "2", "--resume")) == 2
    assert "different config" in capsys.readouterr().err

    # the same folder again without --resume is refused rather than overwritten
    assert main(args_for(tiny_dataset, out, "--epochs", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bad_flags_fail_before_training(tiny_dataset, tmp_path, capsys):
    assert main(args_for(tiny_dataset, tmp_path / "a", "--loss", "ranking", "--alpha", "1.5")) == 2
    assert "alpha must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(args_for(tiny_dataset, tmp_path / "b", "--set", "nonsense=3")) == 2
    assert "unknown config keys ['nonsense']" in capsys.readouterr().err
    assert main(args_for(tiny_dataset, tmp_path / "c", "--resume")) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
@pytest.mark.in_process
def test_eval_on_scores_another_dataset(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args_for(tiny_dataset, out, "--epochs", "1", "--eval-on", str(tiny_dataset.path))) == 0
    result = json.loads((out / "result.json").read_text())
    n = tiny_dataset.stats["processed"]
    assert result["eval_on"][str(tiny_dataset.path)]["n"] == n
