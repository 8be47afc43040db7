"""A kernel manager for the Voilà app (``make app``): at most ``max_kernels`` kernels at once.

Voilà starts a kernel for every GET of the page, authenticated or not, and keeps it while the page could
still connect to it. :class:`CappedKernelManager` refuses a new one beyond ``max_kernels`` with HTTP 503
("too many open sessions") instead of letting a reloading browser or a script fill the memory; jupyter_server's
culler (``cull_idle_timeout``, ``cull_interval``) shuts down the kernels nobody is connected to. The settings
live in ``notebooks/voila.json``, which ``make app`` passes with ``--Voila.config_file_paths=notebooks``;
docs/servers.md explains them. Imported by the Voilà server only (needs jupyter_server, from the
``[notebooks]`` extra).
"""

from __future__ import annotations

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado.web import HTTPError
from traitlets import Integer

__all__ = ["CappedKernelManager"]


class CappedKernelManager(AsyncMappingKernelManager):
    """:class:`~jupyter_server.services.kernels.kernelmanager.AsyncMappingKernelManager` with a kernel cap."""

    max_kernels = Integer(
        4,
        min=1,
        config=True,
        help="Most kernels running at once (each page view holds one); beyond it a new view gets HTTP 503.",
    )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._starting = 0  # kernels being started: counted too, so concurrent requests cannot overshoot

    async def start_kernel(self, *args, **kwargs) -> str:
        """Start a kernel, or raise HTTP 503 when ``max_kernels`` are running or starting."""
        kernel_id = kwargs.get("kernel_id")
        if kernel_id is not None and kernel_id in self:
            return await super().start_kernel(*args, **kwargs)  # an existing kernel: nothing new starts
        running = len(self.list_kernel_ids()) + self._starting
        if running >= self.max_kernels:
            self.log.warning("Refusing a new kernel: %d of at most %d are running", running, self.max_kernels)
            raise HTTPError(503, f"too many open sessions ({self.max_kernels}); close a tab, or try again in a "
                                 "minute (idle sessions are closed)")
        self._starting += 1
        try:
            return await super().start_kernel(*args, **kwargs)
        finally:
            self._starting -= 1
