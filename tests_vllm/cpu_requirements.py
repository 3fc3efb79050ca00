"""Print vLLM's own requirements minus its GPU-only ones: what the CPU-level tests need (`make test-vllm`).

vLLM's wheel pulls ~6 GB of CUDA kernels and libraries (flashinfer, cutlass, cuDNN frontends, CUDA builds of
torchvision/torchaudio/torchcodec) that cannot load next to CPU torch and that nothing in tests_vllm/ touches.
Installing ``vllm --no-deps`` plus this list gives the same vLLM Python code in a fraction of the time. GPU machines
install requirements-vllm.txt in full instead (docs/vllm.md).

Usage: python tests_vllm/cpu_requirements.py > reqs.txt   (run in the environment where vllm is installed --no-deps)
"""

from __future__ import annotations

import re
from importlib.metadata import requires

from packaging.requirements import Requirement

EXTRAS = {"audio"}
GPU_ONLY = re.compile(
    r"^(torch|torchaudio|torchvision|torchcodec|pynvvideocodec|flashinfer.*|apache-tvm-ffi|tilelang|nvidia-.*|nvtx"
    r"|fastsafetensors|instanttensor|quack-kernels|tokenspeed-mla|humming-kernels|cupy.*|xformers)$"
)


def cpu_requirements(distribution: str = "vllm") -> list[str]:
    keep = []
    for line in requires(distribution) or []:
        requirement = Requirement(line)
        environments = [{"extra": extra} for extra in ("", *EXTRAS)]
        if requirement.marker is not None and not any(requirement.marker.evaluate(env) for env in environments):
            continue
        if GPU_ONLY.match(requirement.name.lower()):
            continue
        requirement.marker = None
        keep.append(str(requirement))
    return sorted(set(keep))


if __name__ == "__main__":
    print("\n".join(cpu_requirements()))
