"""What both engines model the same way: node and link costs, payload sizes, acceptance, calibrated profiles.

Below ``sim`` and ``executor`` (which never import each other); it imports only ``scheduling``, ``models`` and
the scenario.
"""
