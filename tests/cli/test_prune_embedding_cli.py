"""`leanscale prune score --metric prototypes --embedding pca|random-projection`: the training-free
prototype path from the command line gives the API's scores; a bad name exits 2."""

import numpy as np

from leanscale.cli.main import main
from leanscale.pruning import DataPruner


def test_prune_score_fast_embedding_matches_the_api(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = rng.normal(scale=3.0, size=(3, 10))[y] + rng.normal(size=(90, 10))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    for method in ("pca", "random-projection"):
        out = tmp_path / method
        assert main(["prune", "score", "--data", str(tmp_path / "d.npz"), "--metric", "prototypes", "--embedding",
                     method, "--n-clusters", "3", "--out", str(out), "--json"]) == 0
        capsys.readouterr()
        got = np.load(out / "scores.npy", allow_pickle=False)
        ref = DataPruner(metric="prototypes", keep=1.0, embedding=method, n_clusters=3).fit(x.astype(np.float32)).scores_
        assert np.allclose(got, ref, atol=1e-6)


def test_prune_score_unknown_embedding_exits_2(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 3)), y=np.arange(20) % 2)
    assert main(["prune", "score", "--data", str(tmp_path / "d.npz"), "--metric", "prototypes", "--embedding",
                 "umap", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'embedding'" in err and "pca" in err and "Traceback" not in err
