"""The controller as a charging station under its own identity (Part 1 §8.3, Part 4 §6.2).

The controller keeps one upstream connection of its own to the CSMS and behaves there as a charging
station without EVSEs. The parts, each in its own module:

* :mod:`router.own.connection` — the websocket under the own identity: reconnect with the back-off of
  Part 4 §5.3, one CALL of ours outstanding at a time (§4.1.1), CSMS calls answered through a table;
* :mod:`router.own.boot` — BootNotification and Heartbeat (B01–B03);
* :mod:`router.own.device_model` — the components and variables the CSMS reads and writes (B05–B08);
* :mod:`router.own.outbox` — what the controller itself sends upstream, durable and in order;
* :mod:`router.own.security_events` — security events (A04): logged, counted, and the critical ones
  queued in the outbox, rate-limited per event type;
* :mod:`router.own.service` — :class:`~router.own.service.OwnIdentity`, which ties them together.
"""
