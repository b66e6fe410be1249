"""EMS limits and site status over MQTT (K14, issue #16).

``settings`` is the ``[mqtt]`` table, ``ems`` applies limit messages to the limit sources (the HTTP
API's validation, validity and failsafe; pure but for the store), ``session`` drives a paho-mqtt
client from trio (the only network I/O), ``service`` keeps the connection with back-off and publishes
the status, ``site_status`` builds the status document and ``status`` the CLI's line.
"""
