import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))  # dense_reference

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and are not slowed down by a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(*shape, generator=None):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


@pytest.fixture
def batch():
    """A small random HP batch: B=3 images of a 4x5 grid, C=6, D=5, pools of 4 entries (float64)."""
    g = torch.Generator().manual_seed(0)
    b, h, w, c, d, m = 3, 4, 5, 6, 5, 4
    n = b * h * w
    return dict(
        z=unit(n, d, generator=g), z_mix=unit(n, d, generator=g), f=unit(n, c, generator=g),
        s_ema=unit(n, d, generator=g), pool_ag=unit(m, c, generator=g), pool_sp=unit(m, d, generator=g),
        b=b, h=h, w=w, p=h * w, n=n,
        rand=torch.rand(n, n, generator=g) < 0.3, rand_shared=torch.rand(h * w, n, generator=g) < 0.3,
    )


@pytest.fixture(scope="session")
def _trained_tiny_run(tmp_path_factory):
    from hpkit.pipeline.config import get_config
    from hpkit.pipeline.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    overrides = ["model.backbone=random_tiny", "data.image_size=32", "data.val_size=32", "data.num_train=24",
                 "data.num_val=6", "data.batch_size=4", "model.dim=16", "loss.pool_size=16", "train.epochs=1"]
    train(get_config("demo", overrides), out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_run(_trained_tiny_run, tmp_path_factory):
    """A finished demo run on random_tiny (32 px, 24 train / 6 val scenes, one epoch), trained once per
    session; each test module gets its own copy, since evaluating a run writes into it."""
    import shutil

    return Path(shutil.copytree(_trained_tiny_run, tmp_path_factory.mktemp("run"), dirs_exist_ok=True))
