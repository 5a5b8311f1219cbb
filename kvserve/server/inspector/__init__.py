"""The KV inspector: a live page of the KV cache at /kv, and its data at /kv/state.

publisher.py   on the engine thread: copies the cache (engine/kv_state.py) while a page
               is watching, samples the metrics into time series
series.py      the time series and the recent TTFT / ITL for their percentiles
state_json.py  a copy as JSON (the documented /kv/state), one block's details, the cost
routes.py      the page, its static files and the JSON routes
"""
