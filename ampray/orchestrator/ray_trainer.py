"""The TorchTrainer that `ampray train` drives: Ray's own, told apart when the user presses Ctrl-C.

Ray Train's `fit()` installs a SIGINT handler that aborts the run's controller; the call then ends in
`SystemExit(0)` or a dead-actor error, neither of which says that the user interrupted it, and the
handler stays installed after `fit()` returns. This trainer remembers the interrupt (raised as
KeyboardInterrupt, which the CLI turns into a note on how to resume) and puts the previous handler back.
Imported only where Ray is installed.
"""

from __future__ import annotations

import signal
import threading

from ray.train.torch import TorchTrainer


class InterruptibleTorchTrainer(TorchTrainer):
    interrupted = False

    def _register_sigint_handler(self, controller) -> None:
        super()._register_sigint_handler(controller)
        rays = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            self.interrupted = True
            if callable(rays):
                rays(signum, frame)

        signal.signal(signal.SIGINT, handler)

    def fit(self):
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT) if main else None
        try:
            result = super().fit()
        except BaseException as err:
            if self.interrupted:
                raise KeyboardInterrupt from err
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self.interrupted:
            raise KeyboardInterrupt
        return result
