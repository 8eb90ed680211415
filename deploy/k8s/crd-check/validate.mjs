// Reads a JSON array of Kubernetes objects on stdin; prints one JSON line per object: {kind, name, errors}.
// The validators are generated from the upstream CRDs' openAPIV3 schemas (npm @kubernetes-models/*), offline.
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { PodMonitor, PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const MODELS = {
  "keda.sh/v1alpha1": { ScaledObject, TriggerAuthentication },
  "monitoring.coreos.com/v1": { PodMonitor, PrometheusRule, ServiceMonitor },
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
for (const obj of JSON.parse(input)) {
  const Model = (MODELS[obj.apiVersion] || {})[obj.kind];
  let errors = [];
  if (!Model) {
    errors = [`no CRD schema here for ${obj.apiVersion} ${obj.kind}`];
  } else {
    try {
      new Model(obj).validate();
    } catch (e) {
      errors = [String(e.message || e)];
    }
  }
  failed ||= errors.length > 0;
  console.log(JSON.stringify({ kind: obj.kind, name: obj.metadata?.name, errors }));
}
process.exit(failed ? 1 : 0);
