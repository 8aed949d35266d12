"""The durable queue: the spool on disk, disk I/O off the reactor, the queue runner."""
