"""`meshcast demo`: applications that start local daemons (`meshcast.runtime`) and drive
them, through the client library (`meshcast.client`) for the cluster demo. A driver at the
top of the stack, beside `meshcast.cli` and `meshcast.bench`: nothing below imports it.
"""
