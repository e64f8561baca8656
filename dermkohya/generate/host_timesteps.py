"""The denoising loop without a device-to-host wait in every scheduler step (issue #18).

PNDM and DDIM read `alphas_cumprod`, a CPU tensor, at the step's timestep, and test `prev_timestep >= 0` in
Python. The pipeline hands `step` its timestep as a tensor on the GPU (it sets the scheduler's timesteps on
the device), so every denoising step waits twice for the GPU to finish the step before: the host cannot
queue step k+1's work while step k runs, and any host work beside the loop (the finisher threads' checks,
hashes and PNGs, which hold the GIL in turns) leaves the GPU idle for as long as it delays the loop.

`HostTimesteps(scheduler)` hands `step` the same timestep from a CPU copy of the schedule, made once per
`set_timesteps` (one wait per batch instead of two per step). The scheduler then reads the same CPU values
it read before, so the pixels are the same bit for bit. The copy is matched to the loop by position;
`check()`, called once the batch has been fetched to the host, compares the timesteps the pipeline really
passed with the copy and raises if they ever differ, so a pipeline that stepped differently cannot go
unnoticed.
"""

from __future__ import annotations

import functools
from typing import Any

SCHEDULERS = ("PNDMScheduler", "DDIMScheduler")  # their step indexes a CPU table with the timestep


class HostTimesteps:
    """Installed on one scheduler object (its `set_timesteps` and `step` wrapped in place)."""

    def __init__(self, scheduler: Any) -> None:
        if type(scheduler).__name__ not in SCHEDULERS:
            raise ValueError(f"{type(scheduler).__name__}: host timesteps are for {', '.join(SCHEDULERS)}")
        self.scheduler = scheduler
        self.host: Any = None  # the schedule, on the CPU
        self.passed: list[Any] = []  # the timesteps the pipeline handed to step, as given
        self._set_timesteps, self._step = scheduler.set_timesteps, scheduler.step

        @functools.wraps(self._set_timesteps)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = self._set_timesteps(*args, **kwargs)
            self.host = scheduler.timesteps.detach().cpu()
            self.passed = []
            return out

        @functools.wraps(self._step)
        def step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            position = len(self.passed)
            self.passed.append(timestep)
            if self.host is not None and position < len(self.host) and hasattr(timestep, "device"):
                timestep = self.host[position]
            return self._step(model_output, timestep, sample, *args, **kwargs)

        scheduler.set_timesteps, scheduler.step = set_timesteps, step

    def check(self) -> None:
        """After the batch's images reached the host: every step got the timestep the pipeline passed."""
        import torch

        if not self.passed:
            return
        passed = torch.stack([torch.as_tensor(t).reshape(()).to("cpu", self.host.dtype) for t in self.passed])
        if len(passed) > len(self.host) or not torch.equal(passed, self.host[: len(passed)]):
            raise RuntimeError(f"{type(self.scheduler).__name__}: the pipeline stepped through timesteps "
                               f"{passed.tolist()}, not the schedule {self.host.tolist()}; the host copy would be "
                               "wrong here: this pipeline needs the scheduler's own step")


def install(scheduler: Any) -> HostTimesteps | None:
    """Host timesteps for a scheduler that needs them, else None (its step waits on nothing per step)."""
    return HostTimesteps(scheduler) if type(scheduler).__name__ in SCHEDULERS else None
