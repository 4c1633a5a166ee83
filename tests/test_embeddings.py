"""POST /v1/embeddings: pooling, the request's checks, the openai client, and
SmolLM2's vectors against transformers' hidden states of the same GGUF."""

from __future__ import annotations

import threading

import numpy as np
import openai
import pytest

from llamazip.runtime.embeddings import EmbeddingError, pool
from llamazip.runtime.engine import Engine
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.model_file import open_model
from llamazip.runtime.openai_api import Defaults
from llamazip.runtime.server import ApiServer
from llamazip.runtime.tokenizer import Tokenizer
from tiny_models import TinyLlama

TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "I love sunny days.",
         "Quantum computers use qubits.", "Le chat dort sur le canapé.", "1, 2, 3, 4, 5",
         "Embeddings map text to vectors.", "What time is it?", "A long, long time ago in a galaxy far away",
         "🙂 emoji and ünïcödé"]


def test_pooling_gives_unit_vectors_of_the_chosen_states():
    hidden = np.array([[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]], dtype=np.float32)
    assert np.allclose(pool(hidden, "cls"), [1, 0]) and np.allclose(pool(hidden, "last"), [2 ** -0.5, 2 ** -0.5])
    mean = np.array([4.0, 5.0]) / 3
    assert np.allclose(pool(hidden, "mean"), mean / np.linalg.norm(mean))
    with pytest.raises(EmbeddingError):
        pool(hidden, "max")


def _serve(engine: Engine, **defaults):
    server = ApiServer(("127.0.0.1", 0), engine, Defaults(**defaults))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="-", max_retries=0)
    return server, client


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    gguf = GGUFFile(TinyLlama(seed=4).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))
    engine = Engine(Model(gguf), Tokenizer.from_metadata(gguf.metadata), None, "tiny")
    server, client = _serve(engine)
    yield engine, client
    server.shutdown()
    server.server_close()


def test_the_openai_client_gets_unit_vectors_whole_and_in_base64(tiny):
    engine, client = tiny
    reply = client.embeddings.create(model="m", input=["hello", "world!"])  # the client asks for base64
    assert [d.index for d in reply.data] == [0, 1] and reply.object == "list"
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert reply.usage.prompt_tokens == len(engine.tokenize("hello")) + len(engine.tokenize("world!"))
    floats = client.embeddings.create(model="m", input="hello", encoding_format="float").data[0].embedding
    assert np.allclose(floats, vectors[0], atol=1e-6)
    ids = client.embeddings.create(model="m", input=engine.tokenize("hello"), encoding_format="float")
    assert np.allclose(ids.data[0].embedding, floats, atol=1e-6)


def test_embedding_a_text_leaves_generation_as_it_was(tiny):
    engine, client = tiny
    before = client.completions.create(model="m", prompt="hello", max_tokens=8, temperature=0).choices[0].text
    client.embeddings.create(model="m", input="hello there, a different text")
    assert client.completions.create(model="m", prompt="hello", max_tokens=8, temperature=0).choices[0].text == before


@pytest.mark.parametrize("body", [{}, {"input": []}, {"input": 5}, {"input": [["a"]]}, {"input": [10 ** 6]},
                                  {"input": "x", "encoding_format": "int8"}, {"input": "x" * 300}])
def test_bad_embedding_requests_are_400s(tiny, body):
    _, client = tiny
    with pytest.raises(openai.BadRequestError):
        client.post("/embeddings", body=body, cast_to=object)
    assert client.embeddings.create(model="m", input="fine").data


@pytest.mark.model
def test_smollm2_embeddings_match_transformers(smollm2_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf = open_model(str(smollm2_path))
    engine = Engine(Model(gguf, n_ctx=512), Tokenizer.from_metadata(gguf.metadata), None, "smollm2")
    server, client = _serve(engine)
    try:
        ours = np.array([d.embedding for d in client.embeddings.create(model="m", input=TEXTS).data])
    finally:
        server.shutdown()
        server.server_close()
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    for text, vector in zip(TEXTS, ours):
        with torch.no_grad():
            hidden = theirs_model.model(torch.tensor([engine.tokenize(text)])).last_hidden_state[0].numpy()
        theirs = hidden.mean(axis=0)
        cosine = float(vector @ theirs / np.linalg.norm(theirs))
        assert cosine >= 0.999, (text, cosine)
