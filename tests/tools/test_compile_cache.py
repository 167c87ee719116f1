"""torch.compile through the entry points (``runtime.compile_cache``: classification's
``cls_common.compile_in_place``, mmengine configs with ``compile=True``) with Inductor's on-disk cache
shared between processes that generate code for different CPU vector ISAs.

Without the ISA in the cache key, a process under ``ATEN_CPU_CAPABILITY=avx2`` ran the AVX-512 code
that an earlier process had cached (loops stepping 16 floats over 8-float vectors): NaN here, heap
corruption the other way round.  ``ATEN_CPU_CAPABILITY`` stands in for a second host with another CPU.
"""
import json
import os
import subprocess
import sys

import torch
from mmengine.config import Config

from runtime.openmmlab import _prepare_environment

from .conftest import REPO

# a LayerNorm over the 384 channels of a 1x1 map (PaCa-Tiny's last stage at 32 px): the smallest graph
# that showed the stale code
WORKER = """
import json, torch
from classification import cls_common
from torch._dynamo.utils import counters
torch.manual_seed(0)
norm = torch.nn.LayerNorm(384).eval()
with torch.no_grad():
    for p in norm.parameters():
        p.normal_()
    x = torch.randn(2, 1, 1, 384)
    eager = norm(x)
    model = cls_common.compile_in_place(norm)
    compiled = model(x)
print(json.dumps({"tag": torch.compiler.config.cache_key_tag, "max_diff": (compiled - eager).abs().max().item(),
                  "hits": counters["inductor"]["fxgraph_cache_hit"]}))
"""


def compile_in_a_process(cache_dir, capability=None, users_tag=None):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1")
    for name, value in (("ATEN_CPU_CAPABILITY", capability), ("TORCH_COMPILE_CACHE_KEY_TAG", users_tag)):
        env.pop(name, None)
        if value:
            env[name] = value
    result = subprocess.run([sys.executable, "-c", WORKER], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_each_vector_isa_compiles_its_own_code_and_reuses_only_that(tmp_path):
    cache = tmp_path / "inductor"
    runs = [compile_in_a_process(cache, capability) for capability in (None, "avx2", None, "default")]
    native, avx2, native_again, scalar = runs
    for run in runs:
        assert run["max_diff"] < 1e-5, runs  # NaN fails this too
    assert native["tag"].startswith("cpu_vec_isa=") and scalar["tag"] == "cpu_vec_isa=none"
    assert avx2["tag"] == "cpu_vec_isa=avx2"
    assert native["hits"] == 0 and scalar["hits"] == 0
    # the cache still serves a process of the same ISA (on an AVX2-only host "native" is AVX2 too)
    assert native_again["hits"] == 1
    assert avx2["hits"] == (1 if native["tag"] == avx2["tag"] else 0)


def test_a_users_own_cache_tag_is_kept(tmp_path):
    tag = compile_in_a_process(tmp_path / "inductor", users_tag="my-cluster")["tag"]
    assert tag.split(",")[0] == "my-cluster" and tag.split(",")[1].startswith("cpu_vec_isa=")


def test_an_mmengine_config_that_compiles_keys_the_caches_too(monkeypatch):
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "")
    _prepare_environment(Config(dict(train_dataloader=dict(num_workers=0))), "none")
    assert torch.compiler.config.cache_key_tag == ""  # nothing compiles, nothing probed
    _prepare_environment(Config(dict(compile=True, train_dataloader=dict(num_workers=0))), "none")
    assert torch.compiler.config.cache_key_tag.startswith("cpu_vec_isa=")
