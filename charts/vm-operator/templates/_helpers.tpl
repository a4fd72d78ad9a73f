{{/*
vm-operator.name: the chart name, or nameOverride. Used in the
app.kubernetes.io/name label; truncated to 63 characters (a label value limit).
*/}}
{{- define "vm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
vm-operator.fullname: prefix of every object name. fullnameOverride wins;
otherwise "<release>-<name>", or just the release name when it already contains
the chart name (so `helm install vm-operator ...` gives "vm-operator", not
"vm-operator-vm-operator"). Truncated to 63 characters for DNS labels.
*/}}
{{- define "vm-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
vm-operator.selectorLabels: the labels that identify this release's operator
pods. Never change them in an upgrade: Deployment selectors are immutable.
*/}}
{{- define "vm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
vm-operator.labels: the recommended app.kubernetes.io labels plus helm.sh/chart,
put on every object the chart creates.
*/}}
{{- define "vm-operator.labels" -}}
{{ include "vm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: vmwebapp
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
vm-operator.image: "<repository>:<tag>[@<digest>]", the tag defaulting to the
chart's appVersion so that a chart release pins the operator release.
*/}}
{{- define "vm-operator.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
vm-operator.serviceAccountName: the ServiceAccount the operator pods run as.
*/}}
{{- define "vm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
vm-operator.scopes: what each operator Deployment watches, as a JSON list
(templates cannot return lists). The operator watches one namespace or all:
[""] means one Deployment for every namespace; a namespace list means one
Deployment per namespace.
*/}}
{{- define "vm-operator.scopes" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else }}
{{- toJson (list "") }}
{{- end }}
{{- end }}

{{/*
vm-operator.leaseName: the leader-election Lease of one scope (pass a dict
with "root" and "scope"). Each watched namespace has its own operator, hence
its own Lease.
*/}}
{{- define "vm-operator.leaseName" -}}
{{- $base := .root.Values.leaderElection.leaseName | default (printf "%s-leader" (include "vm-operator.fullname" .root)) }}
{{- if .scope }}
{{- printf "%s-%s" $base .scope }}
{{- else }}
{{- $base }}
{{- end }}
{{- end }}

{{/*
vm-operator.rules: the RBAC rules the operator needs on the objects it manages,
i.e. every rule `vm-operator rbac` prints except the Lease rule (which is
granted only in the release namespace, see vm-operator.leaseRules). A chart test
checks that these plus the Lease rule are exactly the operator's own list.
*/}}
{{- define "vm-operator.rules" -}}
- apiGroups: ["webapp.vm.dev"]
  resources: ["vmwebapps"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["webapp.vm.dev"]
  resources: ["vmwebapps/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["configmaps", "services", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Read only: the operator hashes referenced Secret keys and never writes Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs", "cronjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
vm-operator.leaseRules: the leader-election rule, granted by a Role in the
release namespace only.
*/}}
{{- define "vm-operator.leaseRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "patch", "update"]
{{- end }}

{{/*
vm-operator.validate: refuses contradictory values with a message that says
what to change. Included once, from the Deployment template.
*/}}
{{- define "vm-operator.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicas is %d but leaderElection.enabled is false: several operators would write at once; enable leader election or set replicas to 1" (int .Values.replicas)) }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor scrapes that Service" }}
{{- end }}
{{- $reserved := list "WATCH_NAMESPACE" "POD_NAME" "POD_NAMESPACE" "LOG_LEVEL" "LOG_FORMAT" "RUST_LOG" "ADMIN_ADDR" "DISABLE_LEADER_ELECTION" }}
{{- range .Values.extraEnv }}
{{- if has .name $reserved }}
{{- fail (printf "extraEnv sets %s, which the chart sets from its own values (watchNamespaces, logLevel, logFormat, adminPort, leaderElection); use those keys instead" .name) }}
{{- end }}
{{- end }}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) .Values.rbac.create }}
{{- fail "serviceAccount.create is false and serviceAccount.name is empty: rbac.create would grant the operator's rights to the namespace's default ServiceAccount; name the ServiceAccount to bind" }}
{{- end }}
{{- end }}
