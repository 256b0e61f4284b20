"""`ats_jax.predict` prepares images with the checkpoint's own preprocessing (mean, std, crop_pct,
interpolation from its `ats_jax.json`), not DeiT's: an AugReg-style big_vision `.npz` (0.5 mean and
std, crop 0.9) gives timm's probabilities under timm's transform of that config, a Hugging Face
directory gives transformers' under its image processor."""

from __future__ import annotations

import numpy as np
import skimage.data
import timm
import torch
import transformers
from PIL import Image
from timm.models.vision_transformer import _load_weights

import convert.__main__ as convert_cli
from ats_jax.models import create_model, registry
from ats_jax.tools import predict
from tests.references import NPZ_NAME, random_hf_model, write_npz


def save_photos(tmp_path) -> list[str]:
  paths = []
  for name, suffix in (('astronaut', 'png'), ('coffee', 'jpg'), ('chelsea', 'png')):
    Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / f'{name}.{suffix}')
    paths.append(str(tmp_path / f'{name}.{suffix}'))
  return paths


def assert_top_probabilities(got: predict.Prediction, probs: np.ndarray, names) -> None:
  best = np.argsort(-probs)[:5]
  assert [n for n, _ in got.top] == [names[c] for c in best]
  np.testing.assert_allclose([q for _, q in got.top], probs[best], rtol=2e-3, atol=1e-6)


def test_npz_predictions_are_timms_under_the_checkpoints_own_preprocessing(tmp_path, capsys):
  src = write_npz(tmp_path, 'big_vision', 'params/', seed=3)
  weights = dict(np.load(src))
  weights['params/head/kernel'] *= 20  # sharper logits: probabilities that tell inputs apart
  np.savez(src, **weights)
  reference = timm.create_model(NPZ_NAME, pretrained=False, no_embed_class=True)
  _load_weights(reference.eval(), str(src))
  assert convert_cli.main([str(src), str(tmp_path / 'ckpt')]) == 0
  capsys.readouterr()
  model = predict.load_model(str(tmp_path / 'ckpt'), dtype='float32')
  assert model.data_config == registry.VIT_DATA_224  # mean/std 0.5, crop 0.9, bicubic
  paths = save_photos(tmp_path)
  got = predict.predict(model, paths)

  own = timm.data.create_transform(
    224, crop_pct=0.9, interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3
  )
  deits = timm.data.create_transform(224, crop_pct=0.875, interpolation='bicubic')
  names = predict.imagenet_classes()
  for path, p in zip(paths, got, strict=True):
    pil = Image.open(path).convert('RGB')
    with torch.no_grad():
      probs = reference(own(pil)[None]).softmax(-1)[0].numpy()
      wrong = reference(deits(pil)[None]).softmax(-1)[0].numpy()
    print(f'{path}: ours {[round(q, 4) for _, q in p.top]}, timm {np.sort(probs)[::-1][:5]}')
    assert_top_probabilities(p, probs, names)
    assert np.abs(np.sort(wrong)[::-1][:5] - [q for _, q in p.top]).max() > 1e-2  # tells apart


def test_hf_directory_predictions_are_transformers_under_its_image_processor(tmp_path, capsys):
  reference = random_hf_model('vit', seed=2).eval()
  src = tmp_path / 'hf'
  reference.save_pretrained(src)
  processor = transformers.ViTImageProcessor()  # resize 224 bilinear, mean/std 0.5, no crop
  processor.save_pretrained(src)
  assert convert_cli.main([str(src), str(tmp_path / 'ckpt'), '--model', NPZ_NAME]) == 0
  capsys.readouterr()
  model = predict.load_model(str(tmp_path / 'ckpt'), dtype='float32')
  assert model.data_config == registry.DataConfig((0.5,) * 3, (0.5,) * 3, 1.0, 'bilinear')
  # square photos: the processor resizes to 224 x 224 whatever the aspect, crop_pct 1.0 keeps it
  paths = []
  for name in ('astronaut', 'camera'):
    Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / f'{name}.png')
    paths.append(str(tmp_path / f'{name}.png'))
  got = predict.predict(model, paths)
  for path, p in zip(paths, got, strict=True):
    inputs = processor(images=Image.open(path).convert('RGB'), return_tensors='pt')
    with torch.no_grad():
      probs = reference(**inputs).logits.softmax(-1)[0].numpy()
    print(f'{path}: ours {[round(q, 4) for _, q in p.top]}, transformers {np.sort(probs)[::-1]}')
    assert_top_probabilities(p, probs, predict.class_names(10))


def test_a_model_without_checkpoint_carries_its_variants_preprocessing():
  assert create_model('deit_tiny_patch16_224', depth=1).data_config == registry.DEIT_DATA
  assert create_model('vit_tiny_patch16_224', depth=1).data_config == registry.VIT_DATA_224
