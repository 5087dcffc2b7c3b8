"""The per-VM event loop: one thread waiting in epoll on guest notifications, host fds and
timers, calling a handler for each ready fd. It knows nothing of KVM or devices."""

from kasou.event.loop import EventLoop, ParkedThread

__all__ = ["EventLoop", "ParkedThread"]
