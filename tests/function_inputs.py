"""The inputs of the function golden table (tools/golden/functions.py records the reference's
values for them; tests/test_same_numbers.py recomputes them). Built from integers only, so
every numpy on every machine makes the same arrays."""
import numpy as np

# -learning_rate_power values Ftrl users pick, and a few general ones
EXPONENTS = (0.25, 0.5, 0.75, 0.1, 0.3, 1.5, 2.0, -0.5)
BETAS = (0.9, 0.999, 0.99, 0.95)
SCHEDULE_STEPS = list(range(0, 3001))
SCHEDULES = {
    "exponential": {"class_name": "ExponentialDecay",
                    "config": {"initial_learning_rate": 0.1, "decay_steps": 7, "decay_rate": 0.96}},
    "exponential_staircase": {"class_name": "ExponentialDecay",
                              "config": {"initial_learning_rate": 0.1, "decay_steps": 13, "decay_rate": 0.5,
                                         "staircase": True}},
    "polynomial": {"class_name": "PolynomialDecay",
                   "config": {"initial_learning_rate": 0.1, "decay_steps": 2500, "end_learning_rate": 0.001,
                              "power": 0.7}},
    "polynomial_cycle": {"class_name": "PolynomialDecay",
                         "config": {"initial_learning_rate": 0.1, "decay_steps": 333, "power": 2.5, "cycle": True}},
    "cosine": {"class_name": "CosineDecay",
               "config": {"initial_learning_rate": 0.1, "decay_steps": 2900, "alpha": 0.01}},
    "cosine_warmup": {"class_name": "CosineDecay",
                      "config": {"initial_learning_rate": 0.0, "decay_steps": 2000, "warmup_target": 0.1,
                                 "warmup_steps": 500}},
    "cosine_restarts": {"class_name": "CosineDecayRestarts",
                        "config": {"initial_learning_rate": 0.1, "first_decay_steps": 97, "t_mul": 1.7,
                                   "m_mul": 0.9, "alpha": 0.001}},
    "inverse_time": {"class_name": "InverseTimeDecay",
                     "config": {"initial_learning_rate": 0.1, "decay_steps": 11, "decay_rate": 0.3}},
}


def pow_inputs(dtype) -> np.ndarray:
    """~1 M inputs, positive ones spread over [1e-6, 1e6] (float32: every 331st bit pattern; float64: the
    float32 set with low bits filled in), plus edge values; a multiple of 8 long."""
    lo, hi = np.float32(1e-6).view(np.int32), np.float32(1e6).view(np.int32)
    x = np.arange(lo, hi, 331, dtype=np.int32).view(np.float32)
    if np.dtype(dtype) == np.float64:
        bits = x.astype(np.float64).view(np.int64) | (np.arange(x.size, dtype=np.int64) * 2654435761 & 0x1FFFFFFF)
        x = bits.view(np.float64)
    edges = np.array([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, np.inf, -np.inf, np.nan, 1e-40, 3.0e38, -8.0, 4.0],
                     dtype=dtype)
    x = np.concatenate([edges, x.astype(dtype)])
    return x[: x.size - x.size % 8]
