"""Site autonomy (Part 4 §6.3 as amended by the 2025-02 errata, item 4.13): the station's CSMS leg is gone,
the controller answers the station itself and keeps what the CSMS must still learn.

The building blocks, each without trio and each with a small interface, so that the pair in
``router/link.py`` only switches modes:

* :mod:`.settings` — ``[autonomy]`` in the configuration file.
* :mod:`.responder` — what the controller answers to each CALL a station sends, and what becomes of it
  (queued for the CSMS, kept as latest state, or dropped).
* :mod:`.auth_cache` — the authorization cache learned from the CSMS's idTokenInfo (C10).
* :mod:`.boot_cache` — the last BootNotification verdict the CSMS gave each station (B01, B02).
* :mod:`.queue` — the durable per-station replay queue and latest-state table on the state store.
* :mod:`.local` — the one call made per station CALL while local: answer, store, reply.
* :mod:`.service` — the site-wide parts (caches, queue, reconnect pacer, metrics) and the read-only view
  of which stations are served locally.
* :mod:`.metrics` — what operators see on ``/metrics``: counters, the replay histogram, per-scrape gauges.
* :mod:`.upstream` — the CSMS leg of a pair under autonomy: relays while the CSMS is there, answers while
  it is not, restores and replays; the seam to :class:`router.link.StationLink` is that it *is* the
  link's CSMS leg (:class:`router.link.CsmsLeg`).
"""
