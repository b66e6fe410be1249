"""Site meters: Modbus TCP grid and circuit meters that let the EVs use what the building leaves.

``settings`` is the ``[[meters]]`` configuration, ``decode`` turns registers into readings (SunSpec
meter models 201–204 or an explicit register map; pure), ``headroom`` turns readings into the capacity
the EVs may use at a node (pure), ``modbus`` reads registers from a meter (the only I/O), and
``service`` polls every meter, keeps the metrics and hands the balancing loop its tighter limits.
"""
