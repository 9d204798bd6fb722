import os
import tempfile

# Set before anything imports triton or transformers: kernels run under the Triton interpreter on CPU,
# and nothing ever reaches for the network.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's on-disk cache is keyed without the CPU capability torch runs with: a kernel compiled under
# the default (e.g. AVX-512) and reused under ATEN_CPU_CAPABILITY=avx2 computed garbage here (torch 2.13). One
# cache per capability keeps the compiled-step tests honest on every CPU kind and setting.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"gradproj-inductor-{os.environ.get('ATEN_CPU_CAPABILITY', 'default')}"),
)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
