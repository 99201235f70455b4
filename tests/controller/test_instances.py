"""InstanceManager: start-up delay, notices and deadlines, on-demand never reclaimed, billing."""
import pytest

from spotserve.controller.instances import InstanceConfig, InstanceManager


def test_lifecycle_deadline_and_cost():
    im = InstanceManager(InstanceConfig(grace_s=30, startup_s=10, spot_usd_per_hour=3600.0,
                                        ondemand_usd_per_hour=7200.0))
    a = im.acquire("a", 0.0)
    assert a.ready_t == 10.0 and im.usable_gpus() == []
    im.mark_ready("a", 10.0)
    assert len(im.usable_gpus()) == 4
    im.notice("a", 50.0)
    assert a.deadline == 80.0 and im.usable_gpus() == [] and len(im.usable_gpus(include_noticed=True)) == 4
    im.reclaim("a", 80.0)
    od = im.acquire("b", 20.0, kind="ondemand", startup_s=0.0)
    im.mark_ready("b", 20.0)
    # $1 per spot instance-second for 80 s (start-up billed) + $2 per on-demand second from 20 to 100
    assert im.cost(100.0) == pytest.approx(80 + 2 * 80)
    with pytest.raises(ValueError, match="on-demand"):
        im.notice("b", 30.0)
    with pytest.raises(ValueError, match="on-demand"):
        im.reclaim("b", 30.0)
    assert od.gpu_ids == [4, 5, 6, 7]


def test_errors():
    im = InstanceManager()
    with pytest.raises(ValueError):
        im.notice("nope", 0.0)
    im.acquire("a", 0.0)
    with pytest.raises(ValueError, match="already held"):
        im.acquire("a", 1.0)
    with pytest.raises(ValueError):
        InstanceConfig(grace_s=-1)
