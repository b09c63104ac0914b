"""Moving a variables tree to another input resolution (paper App. A.1).

Only the relative-bias tables depend on the resolution; each is resized from (2H-1)x(2W-1) to
(2H'-1)x(2W'-1) by bilinear interpolation (half-pixel centres, no antialiasing, as TF's and
PyTorch's bilinear resize). Tables already of the target size are returned untouched.
"""

import flax
import jax
import jax.numpy as jnp


def resize_table(table, height: int, width: int):
  """Bilinear resize of a (heads, h, w) table to (heads, height, width), computed in float32."""
  if table.shape[1:] == (height, width):
    return table
  out = jax.image.resize(jnp.asarray(table, jnp.float32), (table.shape[0], height, width),
                         'bilinear', antialias=False)
  return out.astype(table.dtype)


def resize_variables(model, variables, image_size):
  """Returns ``variables`` for ``model`` applied to images of ``image_size`` (int or (H, W)).

  The target shapes come from the model itself (``jax.eval_shape`` of its init), so any layout,
  square or not, is handled.
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  target_params = flax.traverse_util.flatten_dict(target['params'])

  flat = flax.traverse_util.flatten_dict(dict(variables['params']))
  missing = sorted('/'.join(k) for k in target_params if k not in flat)
  if missing:
    raise ValueError(f'variables do not belong to this model: missing {missing[:3]} ...')
  for path, value in flat.items():
    want = target_params[path].shape
    if value.shape != want:
      if path[-1] != 'relative_bias':
        raise ValueError(f'{"/".join(path)} has shape {value.shape} but the model wants {want}; '
                         'only relative-bias tables change with resolution.')
      flat[path] = resize_table(value, want[1], want[2])
  out = dict(variables)
  out['params'] = flax.traverse_util.unflatten_dict(flat)
  return out
