import os
import sys
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def fresh_aux_loss_scale():
    """Megatron-Core keeps the aux-loss scale on the class: a scale of another shape left by an
    earlier test in this process would not broadcast into the next schedule's (in-process eval
    and training alike). Reset only where Megatron-Core is loaded already."""
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
    yield


@pytest.fixture
def single_process():
    """Megatron-Core parallel state for one process (TP=PP=EP=CP=1), seed 1234."""
    from glm52_train import parallel

    parallel.initialize(seed=1234)
    yield
    parallel.destroy()  # the process groups too: each gloo group holds polling threads


def pytest_addoption(parser):
    parser.addoption(
        "--dsa-case", action="append", default=[], metavar="SPEC",
        help="a DSA shape for the GPU kernel tests, e.g. 'seq=8192,cp=1/4,docs=3,heads=64,topk=2048' "
             "(repeatable; replaces the built-in shapes; see glm52_train/kernels/cases.py)",
    )


def pytest_generate_tests(metafunc):
    """GPU kernel tests take their shapes from `--dsa-case`, or from the module's DSA_GPU_CASES."""
    if "dsa_case" not in metafunc.fixturenames:
        return
    from glm52_train.kernels.cases import DSACase

    given = metafunc.config.getoption("--dsa-case")
    cases = [DSACase.parse(t) for t in given] if given else list(getattr(metafunc.module, "DSA_GPU_CASES"))
    metafunc.parametrize("dsa_case", cases, ids=[c.name for c in cases])


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; results are recorded in docs/benchmarks.md")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


GOLDEN_CORPUS = os.path.join(ROOT, "tests", "data", "golden_corpus.jsonl")
TOKENIZER = os.path.join(ROOT, "data", "tokenizer", "tokenizer.json")


@pytest.fixture(scope="session")
def golden_data(tmp_path_factory):
    """The committed golden corpus tokenized once per session: returns the dataset prefix."""
    from glm52_train.data.prepare import prepare_data

    prefix = str(tmp_path_factory.mktemp("golden-data") / "golden")
    prepare_data([GOLDEN_CORPUS], prefix, TOKENIZER, workers=1)
    return prefix
