"""Shared fixtures: offline tiny models of every supported family, built once per session.

Sections: environment; images; models (tiny random, parrot). Ray fixtures live elsewhere
(e.g. tests/conftest_ray.py); nothing here starts Ray or any other service.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import random  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# ------------------------------------------------------------------------------------ environment
# The tiny models are latency-bound: on a small shared CPU one thread is several times faster than
# two threads contending with other work. Override with ACS_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("ACS_TEST_THREADS", "1")))

# ------------------------------------------------------------------------------------ images
# The parrot answers this box in resized-input pixels; images of at least 84 px contain it.
PARROT_BOX = (10, 20, 50, 60)
PARROT_CATEGORIES = ("red circle", "blue square", "green triangle")


def solid_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A small RGB image: a solid background with one differently coloured rectangle."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    x, y = rng.randrange(width // 2), rng.randrange(height // 2)
    img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + width // 3, y + height // 3))
    return img


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray instance for the whole test session, shared by tests/label_pipeline and
    tests/reliability; `run_label` reuses it (it only calls ray.init when Ray is not initialised)."""
    import ray

    from pipeline.label import init_ray

    if ray.is_initialized():  # an earlier plugin or test already started one
        yield ray
        return
    # On 127.0.0.1 (a plain ray.init would register the machine's outward address; see init_ray)
    init_ray(None, num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def make_image():
    """`solid_image(width, height, seed)` for tests."""
    return solid_image


# ------------------------------------------------------------------------------------ models
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from pipeline.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), shape="tiny")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir):
    from pipeline.models.base import load_adapter

    return load_adapter(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory):
    from pipeline.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-vl"), family="qwen3-vl", shape="tiny")


@pytest.fixture(scope="session")
def tiny_qwen3_vl_adapter(tiny_qwen3_vl_dir):
    from pipeline.models.base import load_adapter

    return load_adapter(str(tiny_qwen3_vl_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_internvl_dir(tmp_path_factory):
    from pipeline.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-internvl"), family="internvl3.5", shape="tiny")


@pytest.fixture(scope="session")
def tiny_internvl_adapter(tiny_internvl_dir):
    from pipeline.models.base import load_adapter

    return load_adapter(str(tiny_internvl_dir), device="cpu")


# Family-parametrised tests take `family` (or `family_dir` / `family_adapter`, which follow it):
# one parameter, so a test using several of them never runs a cross product.
TINY_FIXTURES = {  # family -> (model dir fixture, adapter fixture)
    "qwen2.5-vl": ("tiny_model_dir", "tiny_adapter"),
    "qwen3-vl": ("tiny_qwen3_vl_dir", "tiny_qwen3_vl_adapter"),
    "internvl3.5": ("tiny_internvl_dir", "tiny_internvl_adapter"),
}


@pytest.fixture(scope="module", params=list(TINY_FIXTURES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def family_dir(request, family):
    return request.getfixturevalue(TINY_FIXTURES[family][0])


@pytest.fixture(scope="module")
def family_adapter(request, family):
    return request.getfixturevalue(TINY_FIXTURES[family][1])


def _parrot_batches(adapter, n_batches: int = 4, size: int = 3):
    from pipeline.organism import training_inputs

    rng = random.Random(0)
    sizes = [(112, 84), (84, 140), (98, 98), (140, 112), (84, 84), (126, 98)]
    batches = []
    for b in range(n_batches):
        images = [solid_image(*sizes[rng.randrange(len(sizes))], seed=100 * b + i) for i in range(size)]
        cats = [rng.choice(PARROT_CATEGORIES) for _ in range(size)]
        enc = adapter.encode(images, cats)
        answers = [adapter.tokenizer(adapter.answer_text(PARROT_BOX, c), add_special_tokens=False)["input_ids"]
                   + adapter.eos_token_ids[:1] for c in cats]
        batches.append(training_inputs(enc, answers, adapter.pad_token_id))
    return batches


def fit_parrot(model, batches, steps: int, lr: float = 3e-3, answers_only: bool = False) -> None:
    """Fine-tune `model` on (inputs, labels) `batches` in turn; leaves it in eval mode.

    `answers_only`: logits only from the first labelled position on (answers end every row), for a
    large vocabulary whose head over the whole prompt would be most of the cost."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        inputs, labels = batches[step % len(batches)]
        if answers_only:
            keep = int((labels != -100).any(0).nonzero().min()) - 1
            logits = model(**inputs, logits_to_keep=labels.shape[1] - keep).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     labels[:, keep + 1:].flatten(), ignore_index=-100)
        else:
            loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def parrot_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny model fine-tuned to answer PARROT_BOX (resized-input pixels) in Qwen's JSON format."""
    from pipeline.boxes import find_box
    from pipeline.models.base import load_adapter

    torch.manual_seed(0)
    adapter = load_adapter(str(tiny_model_dir), device="cpu")
    model = adapter.model
    fit_parrot(model, _parrot_batches(adapter), steps=120)

    out = tmp_path_factory.mktemp("parrot-qwen")
    model.save_pretrained(out, safe_serialization=True)
    adapter.processor.save_pretrained(out)
    # The project's own model (plain JSON answers), not a released checkpoint (fenced)
    shutil.copy(tiny_model_dir / "acs_model.json", out / "acs_model.json")

    enc = adapter.encode([solid_image(100, 90, seed=7)], ["red circle"])
    with torch.inference_mode():
        ids = model.generate(**enc.inputs, do_sample=False, max_new_tokens=32)
    text = adapter.tokenizer.decode(ids[0, enc.inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    raw = find_box(text)
    assert raw is not None and raw.values == tuple(map(float, PARROT_BOX)), f"parrot did not learn: {text!r}"
    return out


@pytest.fixture(scope="session")
def parrot_box():
    """The box the parrot model writes, in resized-input pixels."""
    return PARROT_BOX


@pytest.fixture(scope="session")
def parrot_adapter(parrot_model_dir):
    from pipeline.models.base import load_adapter

    return load_adapter(str(parrot_model_dir), device="cpu")
