"""dermkohya.generate.host_timesteps: the scheduler's step gets its timestep from a CPU copy of the schedule, so
PNDM/DDIM never wait for the GPU inside a step, with the same results (issue #18)."""

from __future__ import annotations

import pytest
import torch

from dermkohya.generate import host_timesteps

diffusers = pytest.importorskip("diffusers")


def _run(scheduler: object, device: str, steps: int = 10) -> torch.Tensor:
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, device=device)
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        model_output = torch.sin(sample * 3 + t.float() / 1000)  # stands in for the U-Net: depends on both
        sample = scheduler.step(model_output, t, sample).prev_sample
    return sample


@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler"])
def test_the_same_samples_with_the_schedule_read_on_the_host(name: str) -> None:
    make = getattr(diffusers, name)
    plain = _run(make(), "cpu")
    scheduler = make()
    guard = host_timesteps.install(scheduler)
    assert guard is not None
    assert torch.equal(_run(scheduler, "cpu"), plain)
    guard.check()  # every step got the timestep the loop passed
    assert len(guard.passed) == len(scheduler.timesteps) and torch.equal(guard.host, scheduler.timesteps.cpu())


def test_a_loop_that_steps_out_of_order_is_caught_at_the_batch_end() -> None:
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True)
    guard = host_timesteps.install(scheduler)
    scheduler.set_timesteps(10)
    sample = torch.zeros(1, 4, 8, 8)
    scheduler.step(sample, scheduler.timesteps[1], sample)  # the pipeline skipped the first timestep
    with pytest.raises(RuntimeError, match="not the schedule"):
        guard.check()


def test_schedulers_that_do_not_index_a_host_table_are_left_alone() -> None:
    scheduler = diffusers.EulerDiscreteScheduler()
    step = scheduler.step
    assert host_timesteps.install(scheduler) is None and scheduler.step == step
    with pytest.raises(ValueError, match="host timesteps are for"):
        host_timesteps.HostTimesteps(scheduler)


@pytest.mark.gpu
def test_no_device_to_host_wait_inside_the_steps_on_a_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    plain = diffusers.PNDMScheduler(skip_prk_steps=True)
    with pytest.raises(RuntimeError, match="synchroniz"):  # the scheduler's own step waits (what this module removes)
        _synchronising_steps(plain)
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True)
    guard = host_timesteps.install(scheduler)
    out = _synchronising_steps(scheduler)
    guard.check()
    assert torch.equal(out.cpu(), _run(diffusers.PNDMScheduler(skip_prk_steps=True), "cuda").cpu())


def _synchronising_steps(scheduler: object) -> torch.Tensor:
    """The steps of _run on the GPU with torch's sync debug mode raising on any device-to-host wait."""
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, device="cuda")
    scheduler.set_timesteps(10, device="cuda")
    timesteps = list(scheduler.timesteps)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in timesteps:
            model_output = torch.sin(sample * 3 + t.float() / 1000)
            sample = scheduler.step(model_output, t, sample).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sample
