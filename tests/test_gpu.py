"""The CUDA paths: run when a GPU is present, skipped with the reason otherwise."""

import json

import pytest
import torch

import fixtures
from conftest import TINY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_device_augment_on_cuda_crops_mirrors_and_normalises_each_sample():
    from safetransfer.targets.cache import DeviceAugment

    device = torch.device("cuda")
    images = torch.randint(0, 256, (5, 3, 10, 12), dtype=torch.uint8, device=device)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    out = DeviceAugment(6, mean, std, seed=3, device=device)(images)
    top, left, flip = DeviceAugment(6, mean, std, seed=3, device=device).offsets(5, 10, 12)
    for b in range(5):
        expected = images[b, :, top[b]:top[b] + 6, left[b]:left[b] + 6].float() / 255
        if flip[b]:
            expected = expected.flip(-1)
        expected = (expected - torch.tensor(mean, device=device).view(3, 1, 1)) / torch.tensor(std, device=device).view(3, 1, 1)
        torch.testing.assert_close(out[b], expected)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_job_on_cuda_trains_from_the_cache_with_augmentation_on_the_device(cli, tmp_path, precision):
    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=6, test_per_class=2)
    shrink = [o for o in TINY if not o.startswith(("target.", "runtime.device"))]
    result = cli(*shrink, "runtime.device=cuda", f"train.precision={precision}", "source=scratch", "target=cub200",
                 f"target.root={tmp_path / 'data'}", "target.expected_classes=3", "target.expected_split=[18,6]",
                 "train.batch_size=4", "regularizer=l2sp_bss", "direction=dtnh", "runtime.checkpoint_every=1",
                 f"paths.cache_dir={tmp_path / 'cache'}", "results.dir=res", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "seed_0" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["precision"] == precision
    assert 0 <= metrics["top1"] <= 100


def test_the_gpu_lease_hands_out_a_real_device(tmp_path):
    from safetransfer.sweeps import lease_device

    with lease_device(torch.cuda.device_count(), tmp_path) as device:
        assert torch.zeros(1, device=device).device.type == "cuda"
