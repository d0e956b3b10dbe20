"""Model-loading errors name their cause, and an unreachable Hub fails at once. No test touches the network:
the Hub probe and ``from_pretrained`` are replaced, or the files are local."""

from __future__ import annotations

import json
import threading

import httpx2
import pytest
import requests
import transformers
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.conftest import make_tiny_adapter
from vlcore.errors import ModelLoadError, UnsupportedModelError
from vlcore.models import hub
from vlcore.models.registry import load_adapter

HUB_ID = "dandelin/vilt-b32-finetuned-vqa"
NETWORK_WORDS = "could not be reached"


@pytest.fixture
def online(monkeypatch):
    """Hub access switched on, and the probe answering (no request is sent)."""
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    probes = []
    monkeypatch.setattr(hub, "_probe_hub", lambda endpoint, timeout: probes.append(endpoint))
    hub.forget_probe()
    yield probes
    hub.forget_probe()


@pytest.fixture
def unreachable(monkeypatch):
    """Hub access switched on, but the probe gets no connection (as on a machine with no network)."""
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    probes = []

    def refuse(endpoint, timeout):
        probes.append(endpoint)
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "_probe_hub", refuse)
    hub.forget_probe()
    yield probes
    hub.forget_probe()


def http_error(cls, status: int, message: str):
    url = f"https://huggingface.co/{HUB_ID}/resolve/main/config.json"
    return cls(message, response=httpx2.Response(status, request=httpx2.Request("HEAD", url)))


def wrapped(inner: BaseException, outer: str) -> OSError:
    """What transformers raises: an OSError chained to the hub error."""
    try:
        raise inner
    except BaseException as exc:
        try:
            raise OSError(outer) from exc
        except OSError as out:
            return out


def raise_from_config(monkeypatch, exc: BaseException) -> list[dict]:
    calls = []

    def fail(path, **kwargs):
        calls.append(kwargs)
        raise exc

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fail)
    return calls


def load_error(source: str = HUB_ID, **kwargs) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_adapter(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return info.value


# -- hub errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [
    wrapped(LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached "
            "files.\nCheck your internet connection"),
    httpx2.ConnectError("[Errno 101] Network is unreachable"),
    requests.ConnectionError("HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded"),
    wrapped(TimeoutError("timed out"), "There was a specific connection error when trying to load"),
], ids=["transformers-offline", "httpx", "requests", "timeout"])
def test_a_network_failure_is_reported_as_one(online, monkeypatch, exc):
    raise_from_config(monkeypatch, exc)
    message = str(load_error())
    assert NETWORK_WORDS in message and HUB_ID in message and "bundled demo" in message
    assert "not a model" not in message


def test_offline_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = str(load_error())
    assert "HF_HUB_OFFLINE is set" in message and "not in the local hub cache" in message


@pytest.mark.parametrize("exc, words", [
    (wrapped(http_error(RepositoryNotFoundError, 404, "Repository Not Found for url"),
             "nobody/nothing is not a local folder and is not a valid model identifier"),
     "is not a model on the Hugging Face Hub"),
    (wrapped(http_error(GatedRepoError, 403, "Access to model is restricted"), "You are trying to access a gated repo"),
     "is a gated model"),
    (wrapped(http_error(RevisionNotFoundError, 404, "Revision Not Found"), "v9 is not a valid git identifier"),
     "has no revision 'v9'"),
    (RuntimeError("something else entirely"), "RuntimeError: something else entirely"),
], ids=["no-such-repo", "gated", "no-such-revision", "other"])
def test_a_hub_answer_is_not_called_a_network_failure(online, monkeypatch, exc, words):
    raise_from_config(monkeypatch, exc)
    message = str(load_error(revision="v9"))
    assert words in message and NETWORK_WORDS not in message


def test_losing_the_network_while_downloading_weights_is_a_network_error(online, monkeypatch, tiny_adapter):
    config = tiny_adapter.config.__class__.from_dict({**tiny_adapter.config.to_dict(),
                                                      "architectures": ["ViltForQuestionAnswering"]})
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda path, **kw: config)

    def drop(path, **kwargs):
        raise httpx2.ReadTimeout("The read operation timed out")

    monkeypatch.setattr(transformers.ViltForQuestionAnswering, "from_pretrained", drop)
    message = str(load_error())
    assert NETWORK_WORDS in message and "ReadTimeout" in message


# -- failing fast without a network ------------------------------------------------------------------------------


def test_an_unreachable_hub_fails_without_trying_the_network(unreachable, monkeypatch):
    calls = raise_from_config(monkeypatch, wrapped(LocalEntryNotFoundError("not in the cache"), "We couldn't connect"))
    message = str(load_error())
    assert calls == [{"revision": None, "local_files_only": True, "trust_remote_code": False}]  # the cache only
    assert NETWORK_WORDS in message and "Name or service not known" in message
    load_error()
    assert len(unreachable) == 1  # the probe's answer is kept: a second load does not probe again


def test_a_cached_hub_checkpoint_still_loads_when_the_hub_is_unreachable(unreachable, monkeypatch, tmp_path,
                                                                          tiny_adapter):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--vlscope-test--tiny-vilt"
    snapshot = repo / "snapshots" / commit
    for part in (tiny_adapter.model, tiny_adapter.tokenizer, tiny_adapter.image_processor):
        part.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = load_adapter("vlscope-test/tiny-vilt", device="cpu")
    assert adapter.model_id == f"vlscope-test/tiny-vilt@{commit}"  # the snapshot's commit, not "main"
    assert len(unreachable) == 1


def test_a_probe_with_no_answer_gives_up_after_its_timeout(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(hub, "_probe_hub", lambda endpoint, timeout: release.wait(10))
    hub.forget_probe()
    try:
        assert hub.hub_unreachable(timeout=0.1) == "no answer within 0.1 s"
    finally:
        release.set()
        hub.forget_probe()


def test_a_reachable_hub_is_probed_once_and_loads_normally(online, monkeypatch):
    calls = raise_from_config(monkeypatch, RuntimeError("stop here"))
    load_error()
    load_error()
    assert len(online) == 1 and all(c["local_files_only"] is False for c in calls)


# -- local folders ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tiny_adapter, tmp_path):
    folder = tmp_path / "ckpt"
    for part in (tiny_adapter.model, tiny_adapter.tokenizer, tiny_adapter.image_processor):
        part.save_pretrained(folder)
    return folder


def edit_config(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    message = str(load_error(str(saved)))
    assert "is missing a file" in message and "model.safetensors" in message


def test_a_damaged_safetensors_file(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    message = str(load_error(str(saved)))
    assert "damaged" in message and "not a valid safetensors file" in message


def test_a_config_that_is_not_json(saved):
    (saved / "config.json").write_text("{not json")
    assert "is not valid JSON" in str(load_error(str(saved)))


def test_a_model_type_transformers_does_not_know(saved):
    edit_config(saved, model_type="frobnicator")
    error = load_error(str(saved))
    assert isinstance(error, UnsupportedModelError) and "ViltForQuestionAnswering" in str(error)


def test_weights_that_do_not_fit_the_config(saved):
    edit_config(saved, hidden_size=64, intermediate_size=128)
    assert "do not fit its config.json" in str(load_error(str(saved)))


def test_a_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert "has no config.json" in str(load_error(str(tmp_path)))


def test_a_healthy_folder_still_loads(saved, tiny_tokenizer_dir):
    assert load_adapter(str(saved), device="cpu").task == make_tiny_adapter(tiny_tokenizer_dir).task
