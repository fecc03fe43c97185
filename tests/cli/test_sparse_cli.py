"""`leanscale sparse report|train|export` end to end on small inputs, also under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from leanscale.cli.main import main
from leanscale.models import BNCNN
from leanscale.sparse import apply_swat, load_pruned
from tests.distributed import free_port


def test_report_json_counts_the_sparse_work(capsys):
    assert main(["sparse", "report", "--batch", "8", "--sparsity", "0.8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [r["layer"] for r in report["layers"]]
    assert names == ["features.3", "features.7", "features.10"]  # the first conv and the head stay dense
    for r in report["layers"]:
        assert r["weight_sparsity"] == pytest.approx(0.8, abs=0.01)
        assert r["train_flops_swat"] / r["train_flops_dense"] == pytest.approx(0.2, abs=0.02)
        assert r["held_bytes_swat"] < 0.3 * r["held_bytes_dense"]
    t = report["total"]
    assert t["train_flops_swat"] < 0.35 * t["train_flops_dense"] and t["saved_bytes_swat"] < t["saved_bytes_dense"]


def test_report_text_and_erk(capsys):
    assert main(["sparse", "report", "--batch", "4", "--distribution", "erk", "--sparsity", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "whole model: training FLOPs" in out and "SWATConv2d" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "nope"], "'--model' parameter of leanscale sparse must look like 'package.module:callable'"),
    (["--model", "leanscale.models:Nope"], "must name an importable callable"),
    (["--model", "leanscale.core.registry:list_techniques"], "must return a torch.nn.Module. Got list from"),
    # callables that need arguments: refused before they are called (os.system is never run)
    (["--model", "os:system"], "'--model' parameter of leanscale sparse must name a callable that takes no arguments"),
    (["--model", "json:loads"], "Got 'json:loads', which needs arguments"),
    (["--model", "leanscale.models:__doc__"], "Got 'leanscale.models:__doc__', a str"),
    (["--sparsity", "1.5"], "'sparsity' parameter of apply_swat must be a float in the range [0, 1). Got 1.5"),
    (["--topk-period", "0"], "'topk_period' parameter of apply_swat"),
    (["--distribution", "erdos"], "'distribution' parameter of apply_swat"),
])
def test_report_bad_input(argv, message, capsys):
    assert main(["sparse", "report", "--batch", "4", *argv]) == 2
    assert message in capsys.readouterr().err


def test_model_calls_failing_with_type_error_are_clean_errors(capsys, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(os, "system", lambda command: calls.append(command))  # never reached
    assert main(["sparse", "report", "--model", "os:system"]) == 2
    assert calls == []
    assert "'--model' parameter of leanscale sparse" in capsys.readouterr().err
    import types

    mod = types.ModuleType("leanscale_test_factories")
    mod.needs_args = lambda x: x
    mod.raises_type_error = lambda: int("1", base=[])
    monkeypatch.setitem(__import__("sys").modules, "leanscale_test_factories", mod)
    # needs_args: refused from its signature; raises_type_error: takes no arguments but its call
    # fails with TypeError -> still a message naming --model, not a traceback
    for spec, text in (("leanscale_test_factories:needs_args", "which needs arguments"),
                       ("leanscale_test_factories:raises_type_error", "calling it with no arguments failed")):
        assert main(["sparse", "report", "--model", spec]) == 2
        err = capsys.readouterr().err
        assert "'--model' parameter of leanscale sparse" in err and text in err and "Traceback" not in err


def test_export_checks_model_before_loading(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "swat.pt"
    torch.save(apply_swat(BNCNN(), 0.7).state_dict(), ckpt)
    for spec in ("os:system", "json:loads"):
        assert main(["sparse", "export", "--checkpoint", str(ckpt), "--sparsity", "0.7", "--model", spec,
                     "--out", str(tmp_path / "p.pt")]) == 2
        assert "'--model' parameter of leanscale sparse must name a callable that takes no arguments" in \
            capsys.readouterr().err
    assert not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize("flags,text", [
    (["--out", "{d}"], "'--out' parameter of leanscale sparse train must be a file to write. Got '{d}', which names a folder"),
    (["--save", "{d}/afile/x.pt"], "'--save' parameter of leanscale sparse train must be a file in a folder"),
    (["--checkpoint", "{d}/afile/sub/x.pt"], "'{d}/afile' is a file, not a folder"),
    (["--checkpoint", "{d}/new/"], "which names a folder"),
    (["--out", "{d}/r.json", "--save", "{d}/r.json"], "'--save' parameter of leanscale sparse train must differ from --out"),
])
def test_train_checks_output_paths_before_training(flags, text, tmp_path, capsys, monkeypatch):
    import leanscale.large_batch.train as train_mod

    def no_training(*a, **k):
        raise AssertionError("training started before the output paths were checked")

    monkeypatch.setattr(train_mod, "load_image_data", no_training)
    monkeypatch.setattr(train_mod, "train_classifier", no_training)
    (tmp_path / "afile").write_text("x")
    d = str(tmp_path)
    assert main(["sparse", "train", *[f.format(d=d) for f in flags]]) == 2
    err = capsys.readouterr().err
    assert text.format(d=d) in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "new").exists()


def test_train_output_in_a_missing_folder_is_accepted_before_training(tmp_path, monkeypatch):
    """A folder that does not exist yet is created by the write: not refused."""
    import leanscale.large_batch.train as train_mod

    class Reached(Exception):
        pass

    def stop(*a, **k):
        raise Reached

    monkeypatch.setattr(train_mod, "load_image_data", stop)
    with pytest.raises(Reached):
        main(["sparse", "train", "--out", str(tmp_path / "a" / "b" / "run.json")])


def test_export_out_checked_before_loading(tmp_path, capsys):
    ckpt = tmp_path / "swat.pt"
    torch.save(apply_swat(BNCNN(), 0.7).state_dict(), ckpt)
    before = ckpt.read_bytes()
    assert main(["sparse", "export", "--checkpoint", str(ckpt), "--sparsity", "0.7", "--out", str(tmp_path)]) == 2
    assert "'--out' parameter of leanscale sparse export must be a file to write" in capsys.readouterr().err
    assert main(["sparse", "export", "--checkpoint", str(ckpt), "--sparsity", "0.7", "--out", str(ckpt)]) == 2
    assert "must differ from --checkpoint" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_train_saves_a_pruned_model(tmp_path, capsys):
    out, saved = tmp_path / "run.json", tmp_path / "pruned.pt"
    assert main(["sparse", "train", "--epochs", "0.5", "--set", "n_train=1000", "--set", "n_test=200",
                 "--save", str(saved), "--out", str(out)]) == 0
    assert "SWAT-U 80%: test accuracy" in capsys.readouterr().out
    run = json.loads(out.read_text())
    assert [r["layer"] for r in run["swat_layers"]] == ["features.3", "features.7", "features.10"]  # the head stays dense (#15)
    model = load_pruned(BNCNN(width=8), saved)
    w = model.features[3].weight
    assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    assert float((model.features[0].weight == 0).float().mean()) == 0.0


def test_export_a_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = apply_swat(BNCNN(), 0.7)
    ckpt = tmp_path / "swat.pt"
    torch.save(model.state_dict(), ckpt)  # a plain state_dict: no SWAT settings recorded
    assert main(["sparse", "export", "--checkpoint", str(ckpt), "--sparsity", "0.7", "--out", str(tmp_path / "p.pt")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "records no SWAT settings" in err and "sparsity=0.7" in err
    pruned = load_pruned(BNCNN(), tmp_path / "p.pt")
    assert float((pruned.features[3].weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
    # without --sparsity the training run's sparsity is unknown: refused, not guessed
    assert main(["sparse", "export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q.pt")]) == 2
    assert "'--sparsity' parameter of leanscale sparse export is required" in capsys.readouterr().err
    assert not (tmp_path / "q.pt").exists()
    torch.save({"weight": torch.zeros(2)}, tmp_path / "wrong.pt")
    assert main(["sparse", "export", "--checkpoint", str(tmp_path / "wrong.pt"), "--sparsity", "0.8",
                 "--out", str(tmp_path / "q.pt")]) == 2
    assert "does not fit --model" in capsys.readouterr().err
    assert main(["sparse", "export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "q.pt")]) == 2
    assert "SWAT checkpoint" in capsys.readouterr().err


def test_train_checkpoint_records_the_settings_and_export_uses_them(tmp_path, capsys):
    """The issue's silent failure: exporting with other --sparsity/--distribution than training
    kept other weights (accuracy 0.454 -> 0.294). The recorded settings are used, and a
    mismatch is refused."""
    ckpt, saved = tmp_path / "swat.pt", tmp_path / "pruned.pt"
    assert main(["sparse", "train", "--epochs", "0.2", "--set", "n_train=300", "--set", "n_test=50",
                 "--sparsity", "0.6", "--distribution", "erk", "--checkpoint", str(ckpt), "--save", str(saved)]) == 0
    assert "SWAT checkpoint ->" in capsys.readouterr().out
    out = tmp_path / "exported.pt"
    assert main(["sparse", "export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0  # nothing but the file
    captured = capsys.readouterr()
    assert "settings recorded in the checkpoint" in captured.out and "warning" not in captured.err
    a, b = load_pruned(BNCNN(width=8), saved), load_pruned(BNCNN(width=8), out)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k  # exactly the model `train --save` pruned
    # the same flags as recorded are fine
    assert main(["sparse", "export", "--checkpoint", str(ckpt), "--sparsity", "0.6", "--distribution", "erk",
                 "--out", str(tmp_path / "same.pt")]) == 0
    capsys.readouterr()
    for argv, flag, recorded in (
        (["--sparsity", "0.8"], "--sparsity", "0.6"),
        (["--distribution", "uniform"], "--distribution", "'erk'"),
        (["--structured"], "--structured", "False"),
        (["--sparse-first-layer"], "--sparse-first-layer", "dense_first_layer=True"),
        (["--warmup-steps", "5"], "--warmup-steps", "0"),
    ):
        target = tmp_path / "bad.pt"
        assert main(["sparse", "export", "--checkpoint", str(ckpt), *argv, "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"The '{flag}' parameter of leanscale sparse export must match the training run" in err, err
        assert recorded in err and str(ckpt) in err and "Traceback" not in err
        assert not target.exists()


def test_export_refuses_a_model_whose_layers_differ_from_the_recorded_ones(tmp_path, capsys):
    from leanscale.sparse import save_swat_checkpoint

    torch.manual_seed(0)
    model = apply_swat(BNCNN(), 0.7)
    ckpt = save_swat_checkpoint(model, tmp_path / "swat.pt", {"sparsity": 0.7})
    # --model builds another SWAT layer set than training recorded (here: the layer that stayed dense)
    assert main(["sparse", "export", "--checkpoint", str(ckpt), "--model", "leanscale.models:BNCNN",
                 "--out", str(tmp_path / "p.pt")]) == 0
    capsys.readouterr()
    with torch.no_grad():  # a checkpoint whose recorded layer settings disagree with its run settings
        blob = torch.load(ckpt, weights_only=True)
        blob["layers"]["features.3"]["sparsity"] = 0.5
        torch.save(blob, tmp_path / "edited.pt")
    assert main(["sparse", "export", "--checkpoint", str(tmp_path / "edited.pt"), "--out", str(tmp_path / "q.pt")]) == 2
    err = capsys.readouterr().err
    assert "layer 'features.3' has sparsity=0.7 now but sparsity=0.5 in training" in err


@pytest.mark.distributed
def test_train_under_torchrun(tmp_path):
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "leanscale.cli.main", "sparse", "train", "--epochs", "0.5", "--set", "n_train=512",
           "--set", "n_test=200", "--distribution", "erk", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LEANSCALE_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(out.read_text())
    assert run["world_size"] == 2 and run["distribution"] == "erk" and 0 <= run["test_accuracy"] <= 1


def test_export_reads_the_architecture_key_written_before_the_rename(tmp_path, capsys):
    """#14 renamed the recorded architecture's 'num_classes' to 'n_classes'; old checkpoints still export."""
    from leanscale.sparse.export import save_swat_checkpoint

    torch.manual_seed(0)
    model = apply_swat(BNCNN(n_classes=10, width=8), 0.6)
    ckpt = tmp_path / "old.pt"
    save_swat_checkpoint(model, ckpt, {"sparsity": 0.6},
                         extra={"architecture": {"model": "bncnn", "width": 8, "in_shape": [1, 28, 28],
                                                 "num_classes": 10}})
    out = tmp_path / "p.pt"
    assert main(["sparse", "export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    capsys.readouterr()
    pruned = load_pruned(BNCNN(width=8), out)
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)
