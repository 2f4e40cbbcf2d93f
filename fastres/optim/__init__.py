"""Fused multi-tensor optimizers: drop-in replacements for torch.optim.

Each ``step()`` updates every param of a param group that shares a device and
dtype in one Triton launch, whatever the number of tensors, without
synchronising with the device. Same arguments, defaults, state_dict layout
and numbers as torch.optim; works with param groups, LR schedulers, closures
and ``torch.amp.GradScaler`` (which it lets skip its host synchronisation).
Params the kernels do not take (CPU without the interpreter, float64) step
through torch.optim's fastest implementation of the same update.
"""

from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .clip import clip_grad_norm_
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "clip_grad_norm_"]
