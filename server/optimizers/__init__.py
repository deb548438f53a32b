"""The optimizer classes sparseps reproduces, one file each, looked up by Keras class name.

To add one: write `<name>.py` with one class (its reference named at the top of the docstring:
repository, file, version), import it here and `register` it. When Keras also has non-legacy
classes of the same name, register them with it as its flavours (keras2=..., keras3=...): they
share its class names and registry.resolve picks one from the config's keys (keras_new.flavour).
"""
from .adagrad import Adagrad, Keras3Adagrad
from .adam import Adam
from .base import Optimizer
from .ftrl import Ftrl, Keras3Ftrl
from .keras_adam import Keras3Adam, KerasAdam
from .keras_sgd import Keras3SGD, KerasSGD
from .lazy_adam import LazyAdam
from .lazy_adam_v1 import LazyAdamV1
from .lookahead import Lookahead
from .rectified_adam import RectifiedAdam
from .rmsprop import Keras3RMSprop, RMSprop
from .registry import from_config, register, resolve, supported
from .sgd import SGD
from .torch_adagrad import TorchAdagrad
from .torch_sgd import TorchSGD
from .torch_sparse_adam import TorchSparseAdam

register(LazyAdam)
register(Adam, keras2=KerasAdam, keras3=Keras3Adam)
register(SGD, keras2=KerasSGD, keras3=Keras3SGD)
register(RectifiedAdam)
register(Lookahead)
register(LazyAdamV1)
register(Adagrad, keras3=Keras3Adagrad)
register(Ftrl, keras3=Keras3Ftrl)
register(RMSprop, keras3=Keras3RMSprop)
register(TorchSparseAdam)
register(TorchAdagrad)
register(TorchSGD)

__all__ = ["Adagrad", "Adam", "Ftrl", "Keras3Adagrad", "Keras3Adam", "Keras3Ftrl", "Keras3RMSprop", "Keras3SGD",
           "KerasAdam", "KerasSGD", "LazyAdam", "LazyAdamV1", "Lookahead", "Optimizer", "RMSprop", "RectifiedAdam",
           "SGD", "TorchAdagrad", "TorchSGD", "TorchSparseAdam", "from_config", "register", "resolve", "supported"]
