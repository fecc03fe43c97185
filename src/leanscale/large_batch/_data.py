"""Moved to :mod:`leanscale.train.user_data` (shared by every technique); kept for old imports."""

from leanscale.train.user_data import (  # noqa: F401
    _USER_CODE_ERRORS,
    _is_oom,
    check_finite_x,
    check_loss_has_grad,
    check_scalar_loss,
    check_xy_pair,
    describe,
    is_xy_pair,
    iter_xy_batches,
    model_loss,
    user_code,
)
