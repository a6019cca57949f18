#!/usr/bin/env bash
# End to end on a real cluster, for machines where kind can pull its node image (not run in
# CI here: no registry is reachable):
# kind cluster -> image -> helm install (two operator replicas) -> a store -> an agent
# pod that converses through its sidecar -> the history survives a pod restart -> the
# leading operator pod is deleted, the other takes the Lease and reconciles a change ->
# the same with the webhook disabled. The steps of tests/operator/test_as_deployed.py,
# on a real API server. Needs docker (or podman), kind, kubectl and helm on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=${CLUSTER:-convostore-e2e}
image=convostore:e2e

kind create cluster --name "$cluster" --wait 120s
trap '[ "${KEEP:-}" = 1 ] || kind delete cluster --name "$cluster"' EXIT
bash scripts/build-images.sh --repository convostore --tag e2e
kind load docker-image "$image" convostore-sidecar:e2e --name "$cluster"

helm install convostore charts/convostore -n convostore-system --create-namespace \
  --set image.repository=convostore --set image.tag=e2e --set image.pullPolicy=Never --wait
helm test convostore -n convostore-system

kubectl create namespace agents
kubectl apply -f manifests/examples/store-sqlite.yaml
kubectl wait -n agents cstore/scratch --for=jsonpath='{.status.phase}'=Ready --timeout=60s

# The "agent" is the image itself, which writes and reads through its sidecar with the
# client library.
kubectl apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: e2e-agent, namespace: agents}
spec:
  replicas: 1
  selector: {matchLabels: {app: e2e-agent}}
  template:
    metadata:
      labels: {app: e2e-agent, convostore.dev/inject: "true"}
      annotations: {convostore.dev/inject: "true", convostore.dev/stores: scratch}
    spec:
      containers:
        - name: agent
          image: $image
          imagePullPolicy: Never
          command: [sleep, infinity]
YAML
kubectl rollout status -n agents deployment/e2e-agent --timeout=120s
pod() { kubectl get pod -n agents -l app=e2e-agent -o jsonpath='{.items[0].metadata.name}'; }
converse='
import asyncio
from convostore import SidecarSession
async def main():
    s = SidecarSession("e2e-user", store="scratch")
    await s.add_items([{"role": "user", "content": "remember me"}])
    print(len(await s.get_items()))
asyncio.run(main())'
kubectl exec -n agents "$(pod)" -c agent -- python -c "$converse"

# Restart the agent container (not the pod: the sidecar's emptyDir keeps the SQLite file).
kubectl exec -n agents "$(pod)" -c agent -- kill 1 || true
kubectl wait -n agents pod/"$(pod)" --for=condition=Ready --timeout=60s
count=$(kubectl exec -n agents "$(pod)" -c agent -- python -c "
import asyncio
from convostore import SidecarSession
print(len(asyncio.run(SidecarSession('e2e-user', store='scratch').get_items())))")
[ "$count" -ge 1 ] || { echo "history lost across the restart" >&2; exit 1; }
echo "e2e: history survived the restart ($count items)"

# Hand-over: delete the leading operator pod (SIGTERM, as in a rollout); the other
# replica must take the Lease and reconcile a spec change.
ns=convostore-system
lease=convostore-leader
holder() { kubectl get lease -n "$ns" "$lease" -o jsonpath='{.spec.holderIdentity}'; }
handover() {
  local leader
  leader=$(holder)
  [ -n "$leader" ] || { echo "no operator replica holds the Lease" >&2; exit 1; }
  start=$(date +%s.%N)
  kubectl delete pod -n "$ns" "$leader" --wait=true --timeout=60s
  for _ in $(seq 60); do
    now=$(holder)
    [ -n "$now" ] && [ "$now" != "$leader" ] && break
    sleep 1
  done
  [ -n "$now" ] && [ "$now" != "$leader" ] || { echo "nobody took over from $leader" >&2; exit 1; }
  echo "e2e: $now took over from $leader in $(echo "$(date +%s.%N) - $start" | bc) s"
  generation=$(kubectl get cstore -n agents scratch -o jsonpath='{.metadata.generation}')
  kubectl patch cstore -n agents scratch --type merge -p "{\"spec\":{\"retention\":{\"ttl\":\"${1}\"}}}"
  kubectl wait -n agents cstore/scratch --timeout=60s \
    --for=jsonpath='{.status.observedGeneration}'=$((generation + 1))
}
handover 1h

# The webhook disabled: the operator must still reconcile, and still hand over.
helm upgrade convostore charts/convostore -n convostore-system --reuse-values \
  --set webhook.enabled=false --wait
kubectl rollout status -n "$ns" deployment/convostore --timeout=120s
handover 2h
echo "e2e: hand-over works with and without the webhook"
