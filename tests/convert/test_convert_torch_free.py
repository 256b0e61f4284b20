"""`.pth` files read with NumPy (`torch_pickle`): the arrays torch.load gives, no PyTorch needed,
and nothing but tensor state dicts admitted."""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import convert.__main__ as convert_cli
from ats_jax.convert import pretrained, torch_pickle
from tests.references import random_timm_model

NAME = 'deit_tiny_patch16_224'
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tricky_state_dict() -> collections.OrderedDict:
  """Views, transposes, a Parameter, half/bfloat16/int, a scalar, an empty tensor, `_metadata`."""
  torch.manual_seed(0)
  base = torch.randn(4, 6)
  sd = collections.OrderedDict(
    full=base,
    view=base[:, 1:4],
    transposed=base.T,
    param=torch.nn.Parameter(torch.randn(5)),
    half=torch.randn(3, 2).half(),
    bf16=torch.randn(2, 3).bfloat16(),
    long=torch.arange(7),
    scalar=torch.tensor(3.5),
    empty=torch.zeros(0, 4),
    flag=torch.tensor([True, False]),
  )
  sd._metadata = {'': {'version': 2}}
  return sd


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_reads_what_torch_load_reads(tmp_path, legacy):
  src = tmp_path / 'sd.pth'
  torch.save(
    {'model': tricky_state_dict(), 'epoch': 7}, src, _use_new_zipfile_serialization=not legacy
  )
  expected = torch.load(src, weights_only=True)
  got = torch_pickle.load(src)
  assert got['epoch'] == 7 and list(got['model']) == list(expected['model'])
  for key, tensor in expected['model'].items():
    array = got['model'][key]
    assert isinstance(array, np.ndarray) and array.shape == tuple(tensor.shape), key
    assert str(array.dtype) == str(tensor.dtype).removeprefix('torch.'), key
    np.testing.assert_array_equal(array.astype(np.float64), tensor.detach().double().numpy())


def test_refuses_what_weights_only_refuses(tmp_path, capsys):
  src = tmp_path / 'train_state.pth'
  torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=1e-3)}, src)
  with pytest.raises(torch.serialization.pickle.UnpicklingError):
    torch.load(src, weights_only=True)
  assert convert_cli.main([str(src), str(tmp_path / 'out')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'argparse.Namespace' in err[0]
  assert "torch.save(checkpoint['model']" in err[0]


def test_refuses_code_without_running_it(tmp_path):
  marker = tmp_path / 'ran'

  class Exploit:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  src = tmp_path / 'evil.pth'
  src.write_bytes(pickle.dumps({'model': Exploit()}, protocol=2))
  with pytest.raises(pretrained.CheckpointError, match=r'refers to (posix|os)\.system'):
    pretrained.read_state_dict(src)
  assert not marker.exists()


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
  src = tmp_path / 'sd.pth'
  torch.save({'w': torch.ones(4)}, src)
  original = torch_pickle._rebuild_tensor_v2
  try:  # as a forged file would: size 8 on a storage of 4 elements
    torch_pickle._ALLOWED[('torch._utils', '_rebuild_tensor_v2')] = (
      lambda storage, offset, size, stride, *rest: original(storage, offset, (8,), stride)
    )
    with pytest.raises(torch_pickle.TorchPickleError, match='past the end of its storage'):
      torch_pickle.load(src)
  finally:
    torch_pickle._ALLOWED[('torch._utils', '_rebuild_tensor_v2')] = original


def test_cli_converts_a_pth_where_torch_cannot_be_imported(tmp_path):
  """`python -m convert` with `import torch` failing gives the in-process (torch-read) result."""
  state_dict = random_timm_model(NAME).state_dict()
  srcs = {'zip': tmp_path / 'deit.pth', 'legacy': tmp_path / 'legacy.pth'}
  torch.save({'model': state_dict}, srcs['zip'])
  torch.save(state_dict, srcs['legacy'], _use_new_zipfile_serialization=False)
  blocker = tmp_path / 'no_torch'
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text("import sys\nsys.modules['torch'] = None\n")
  env = dict(os.environ, PYTHONPATH=f'{blocker}{os.pathsep}{REPO}', JAX_PLATFORMS='cpu')
  probe = subprocess.run(
    [sys.executable, '-c', 'import torch'], env=env, capture_output=True, text=True, check=False
  )
  assert probe.returncode == 1 and 'import of torch halted' in probe.stderr  # the trick works
  reference = {k: v.numpy() for k, v in state_dict.items()}
  for fmt, src in srcs.items():
    out = tmp_path / f'out_{fmt}'
    proc = subprocess.run(
      [sys.executable, '-m', 'convert', str(src), str(out), '--model', NAME],
      env=env,
      capture_output=True,
      text=True,
      check=False,
      cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / 'ats_jax.json').read_text())['model'] == NAME
    converted = pretrained.load_converted(out)
    expected = pretrained.convert_state_dict(reference, NAME)
    assert converted.params.keys() == expected.params.keys()
    for key, value in expected.params.items():
      np.testing.assert_array_equal(converted.params[key], value, err_msg=f'{fmt} {key}')
