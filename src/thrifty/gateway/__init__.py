"""thrifty.gateway: one request's policy in front of the model servers, usable without HTTP.

gateway.py       Gateway: prepare (the tier's backend checks the request) and start/generate (tenant scope ->
                 exact / semantic cache -> coalescer -> dispatch -> store -> ledger)
request.py       GatewayRequest in; BackendRequest (checked by a backend); GatewayOutput and Reply out
dispatch.py      router -> backend with fallback -> cascade check -> the cost's booking
cache_policy.py  which requests the response cache takes part in, their keys, replays of stored answers
backends.py, remote.py   the local engine and remote OpenAI-compatible APIs
router.py, cascade.py, classifier_router.py, ...   routing strategies; costs.py, ledger.py: prices and the ledger
cache/           the response cache: keys, guard, embedded and Redis stores, circuit breaker
tiers.py         from the config to a running gateway
"""
