"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels: a student (encoder + DINO head, ssl_jax.models.heads.DINOHead) matches
the sharpened, centred output distribution of a teacher whose parameters are an exponential moving average
of the student's (cosine 0.996 -> 1 per step, main_dino.py l.249-251, 346-350). Multi-crop: every crop
goes through the student (one backbone call per resolution, the head on all of them at once:
utils.MultiCropWrapper l.594-629), only the global crops (the first two views) through the teacher, and
the loss is the cross-entropy over every (teacher crop, student crop) pair of different crops
(ssl_jax.losses.dino_loss).

`method_state`: the teacher's parameters and batch-norm statistics (it runs in training mode, as the
official teacher, which is never put in eval mode), and the center: an EMA (0.9) of the mean teacher
output over the global batch, updated after the loss with the step's teacher outputs (l.406-416). The
teacher has no drop path (l.172-176); the student's is model.drop_path_rate. The teacher temperature rises
linearly over the first warmup_teacher_temp_epochs epochs and is then constant, PER EPOCH (l.386-391).

Evaluation reads the teacher's backbone (eval_knn.py / eval_linear.py load `teacher`): see
encoder_variables.

Collapse guard (dino#246, dino#43): the metrics carry the teacher's entropy and the KL from teacher to
student (loss = entropy + KL); `log_warnings` warns when the loss and the teacher's entropy sit near
log(out_dim), the uniform collapse.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, optim, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base
from ssl_jax.models.heads import DINOHead

NUM_GLOBAL_CROPS = 2  # the teacher's crops: always the first two views (main_dino.py l.419-464)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="dino",
      # Head (vision_transformer.py DINOHead l.257-291; main_dino.py args): 3 layers 2048-2048-256, GELU,
      # no BN, 65536 prototypes. norm_last_layer freezes the prototypes' norms g at 1 (the configs add the
      # optimizer group "projector/last_layer/g": frozen when it is True).
      out_dim=65536,
      hidden_dim=2048,
      bottleneck_dim=256,
      head_layers=3,
      use_bn_in_head=False,
      norm_last_layer=True,
      momentum_teacher=0.996,
      momentum_teacher_end=1.0,       # the cosine's end (main_dino.py: 1; lightly's CIFAR-10 benchmark: 0.99, constant)
      student_temp=0.1,
      warmup_teacher_temp=0.04,
      teacher_temp=0.04,              # the code default; the published runs use 0.07 (the configs set it)
      warmup_teacher_temp_epochs=0,
      center_momentum=0.9,
  ))


class DINO(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    m = cfg.method
    base.check_positive(cfg, "student_temp", "teacher_temp", "warmup_teacher_temp")
    base.check_fraction(cfg, "momentum_teacher", "momentum_teacher_end", "center_momentum")
    if m.warmup_teacher_temp_epochs < 0 or int(m.warmup_teacher_temp_epochs) != m.warmup_teacher_temp_epochs:
      raise ConfigError(f"method.warmup_teacher_temp_epochs must be a whole number >= 0 (the schedule is per "
                        f"epoch), got {m.warmup_teacher_temp_epochs}")
    if m.head_layers < 1 or min(m.out_dim, m.hidden_dim, m.bottleneck_dim) <= 0:
      raise ConfigError("method.head_layers must be >= 1 and out_dim, hidden_dim, bottleneck_dim > 0")
    sizes = base.view_crop_sizes(cfg)
    if len(sizes) < NUM_GLOBAL_CROPS or sizes[0] != sizes[1]:
      raise ConfigError(f"dino takes {NUM_GLOBAL_CROPS} global crops of one size first (the teacher's), then "
                        f"any local crops; the config's crop sizes are {sizes}")

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.update(out_dim=256, hidden_dim=128, bottleneck_dim=64)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = base.build_encoder(config)
    # The teacher has no drop path (main_dino.py l.172-176: only the student gets drop_path_rate).
    overrides = {"drop_path_rate": 0.0} if "drop_path_rate" in config.model else {}
    self.teacher_encoder = base.build_encoder(config, **overrides)
    self.head = DINOHead(hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim, output_dim=m.out_dim,
                         num_layers=m.head_layers, use_bn=m.use_bn_in_head, dtype=base.dtype_of(config),
                         bn_axis_name=parallel.DATA, bn_momentum=config.model.bn_momentum)
    self.network = base.Network(encoder=self.encoder, projector=self.head)
    self.teacher_momentum = optim.cosine_increase(m.momentum_teacher, config.total_steps,
                                                  final=m.momentum_teacher_end)

  def init(self, rng, batch):
    params, batch_stats = base.init_network(self.network, rng, batch["views"][0])
    center = jnp.zeros((self.config.method.out_dim,), jnp.float32)
    # The teacher starts as the student's copy (main_dino.py l.189-208: load_state_dict of the student).
    return params, batch_stats, {"teacher_params": params, "teacher_batch_stats": batch_stats, "center": center}

  def epoch(self, step):
    """The integer epoch of `step` (the teacher temperature's schedule is per epoch)."""
    if self.data is None:
      raise ValueError("DINO's teacher temperature is scheduled in epochs: build the method with the data's "
                       "facts (methods.get(config, DataFacts(...)))")
    return jnp.floor(jnp.asarray(step, jnp.float32) / self.data.steps_per_epoch).astype(jnp.int32)

  def teacher_temperature(self, step):
    m = self.config.method
    return losses.dino_teacher_temperature(self.epoch(step), m.warmup_teacher_temp, m.teacher_temp,
                                           int(m.warmup_teacher_temp_epochs))

  def _forward(self, encoder, params, batch_stats, crops, rng):
    """Logits of each crop: the backbone once per resolution, the head once on all of them."""
    hs, encoder_stats = base.forward_crops(encoder, params["encoder"], batch_stats.get("encoder", {}), crops,
                                           rng)
    h = base.head_input(encoder, jnp.concatenate(hs, axis=0))
    logits, head_stats = base.apply_train(self.head, params["projector"], batch_stats.get("projector", {}), h)
    n = crops[0].shape[0]
    stats = dict(batch_stats, **({"encoder": encoder_stats} if "encoder" in batch_stats else {}),
                 **({"projector": head_stats} if "projector" in batch_stats else {}))
    return hs[0], [logits[i * n:(i + 1) * n] for i in range(len(crops))], stats

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    m = self.config.method
    crops = batch["views"]
    teacher_crops = crops[:NUM_GLOBAL_CROPS]
    h1, student, batch_stats = self._forward(self.encoder, params, batch_stats, crops, base.dropout_key(rng, 0))
    _, teacher, teacher_stats = self._forward(self.teacher_encoder, method_state["teacher_params"],
                                              method_state["teacher_batch_stats"], teacher_crops, None)
    teacher = [jax.lax.stop_gradient(t) for t in teacher]
    center = method_state["center"]
    temperature = self.teacher_temperature(step)
    loss = losses.dino_loss(student, teacher, center, m.student_temp, temperature)
    metrics = dict(losses.dino_diagnostics(student, teacher, center, m.student_temp, temperature,
                                           global_sum=parallel.sum),
                   teacher_temperature=temperature)
    # This device's mean teacher output; the trainer averages it over devices (equal shares of the batch),
    # which is the all-reduced batch mean of l.406-416.
    batch_center = jnp.mean(jnp.concatenate(teacher, axis=0), axis=0)
    return loss, base.LossOutput(batch_stats=batch_stats, metrics=metrics, representation=h1,
                                 embedding=student[0],
                                 state_stats={"teacher_batch_stats": teacher_stats, "batch_center": batch_center})

  def update_state(self, method_state, params, state_stats, per_example, step):
    teacher = base.ema(method_state["teacher_params"], params, self.teacher_momentum(step))
    center = base.ema(method_state["center"], state_stats["batch_center"], self.config.method.center_momentum)
    return {"teacher_params": teacher, "teacher_batch_stats": state_stats["teacher_batch_stats"],
            "center": center}

  def encoder_variables(self, params, batch_stats, method_state):
    """The teacher's backbone: what DINO evaluates (eval_knn.py / eval_linear.py --checkpoint_key teacher)."""
    return {"params": method_state["teacher_params"]["encoder"],
            "batch_stats": method_state["teacher_batch_stats"].get("encoder", {})}

  def log_warnings(self, row):
    """The uniform collapse (dino#246, dino#43): the loss near log(out_dim) with the teacher's distribution
    near uniform (both within 5% of log(out_dim)); a sharp teacher with the same loss is not this."""
    log_k = math.log(self.config.method.out_dim)
    loss, entropy = float(row.get("loss", 0.0)), float(row.get("teacher_entropy", 0.0))
    if loss >= 0.95 * log_k and entropy >= 0.95 * log_k:
      return [f"DINO loss {loss:.4f} and teacher entropy {entropy:.4f} sit near log(out_dim) = {log_k:.4f}: the "
              "teacher's output is (nearly) uniform, the collapse of dino#246. Check the teacher temperature, "
              "the center momentum and the learning rate"]
    return []
