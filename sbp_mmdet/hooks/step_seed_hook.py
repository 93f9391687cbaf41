"""A hook that makes a training step's random draws a function of (seed, rank, step)."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..engine.seeding import SeededIterator, derived_seed, seed_global_generators

# Salts that keep the reseeding streams of the two kinds of loops apart.
ITER_SALT, EPOCH_SALT = 1, 2


@HOOKS.register_module()
class StepSeedHook(Hook):
    """Reseeds the global generators at fixed points of the training loop.

    Before each batch is fetched (iteration-based loops) or before each epoch
    (epoch-based loops) the Python, numpy and torch generators are seeded from
    ``(run seed, rank, position)`` (:class:`sbp_mmdet.engine.seeding.SeededIterator`).
    The random draws of a step (the data pipeline's in the main process, the
    detector's RPN/RoI sampling) then depend on the seed and the step alone,
    not on what consumed the generators before. Two uses:

    - a resumed run draws as the uninterrupted one did (``SBPHook``, a
      subclass, does this for SBP runs);
    - a dense run and an SBP run of one seed see the same data and the same
      sampling step by step, so that their accuracy can be compared pair by
      pair (the dense synthetic configs carry this hook; the SBP masks draw
      from their own streams and never touch the global generators).

    The run seed is ``runner.seed`` (``randomness.seed``, or the one mmengine
    drew at start; restored on resume). The hook takes no config keys.

    Example:
        >>> custom_hooks = [dict(type='StepSeedHook')]
    """

    priority = 'NORMAL'

    def __init__(self) -> None:
        self.seed = None

    def run_seed(self, runner) -> int:
        """The seed the streams derive from."""
        return int(runner.seed)

    def before_train(self, runner) -> None:
        self.seed = self.run_seed(runner)
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator') and \
                not isinstance(loop.dataloader_iterator, SeededIterator):
            loop.dataloader_iterator = SeededIterator(loop.dataloader_iterator, self.seed,
                                                      ITER_SALT)

    def before_train_epoch(self, runner) -> None:
        if not isinstance(getattr(runner.train_loop, 'dataloader_iterator', None),
                          SeededIterator):
            seed_global_generators(derived_seed(self.seed, runner.rank, EPOCH_SALT,
                                                runner.epoch))
