{{/* Names and labels. */}}
{{- define "tunefetch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tunefetch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tunefetch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tunefetch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tunefetch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tunefetch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tunefetch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tunefetch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tunefetch.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}


{{- define "tunefetch.milvusName" -}}
{{- printf "%s-milvus" (include "tunefetch.fullname" .) }}
{{- end }}

{{- define "tunefetch.keysDir" -}}/etc/tunefetch/keys{{- end }}

{{/*
The config the pods run with: .Values.config plus what the chart owns (the bundled Milvus's
address, the mounted API keys file). Fails with the reason when the values cannot serve.
*/}}
{{- define "tunefetch.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $milvus := .Values.milvus }}
{{- if and $milvus.bundled.enabled $milvus.external.uri }}
{{- fail "milvus: set either milvus.bundled.enabled or milvus.external.uri, not both" }}
{{- end }}
{{- if $milvus.bundled.enabled }}
{{- $_ := set $config.retrieval "milvus_uri" (printf "http://%s:%d" (include "tunefetch.milvusName" .) (int $milvus.bundled.port)) }}
{{- else if $milvus.external.uri }}
{{- $_ := set $config.retrieval "milvus_uri" $milvus.external.uri }}
{{- else if not $config.retrieval.milvus_uri }}
{{- fail "milvus: a deployment needs a Milvus server: milvus.bundled.enabled: true, or milvus.external.uri" }}
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
{{- $_ := set $config.serving "keys_file" (printf "%s/%s" (include "tunefetch.keysDir" .) .Values.apiKeys.key) }}
{{- else if not $config.serving.allow_unauthenticated }}
{{- fail "apiKeys.existingSecret: the API is reachable from the cluster network, so it needs API keys (a Secret with the keys.json `tunefetch keys create` writes), or config.serving.allow_unauthenticated: true" }}
{{- end }}
{{- $_ := set $config.serving "host" "0.0.0.0" }}{{/* pods serve on every interface (Serve's http_options) */}}
{{- if .Values.training.storagePath }}
{{- $_ := set $config.ray "storage_path" .Values.training.storagePath }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Serve's deployment options, as serving/app.py's deployment_options writes them. */}}
{{- define "tunefetch.deployment" -}}
{{- $d := .options -}}
- name: {{ .name }}
{{- if $d.autoscaling }}
  autoscaling_config:
    {{- toYaml (merge (deepCopy $d.autoscaling) (include "tunefetch.autoscalingDefaults" . | fromJson)) | nindent 4 }}
{{- else }}
  num_replicas: {{ $d.num_replicas }}
{{- end }}
  max_ongoing_requests: {{ $d.max_ongoing_requests }}
  max_queued_requests: {{ $d.max_queued_requests }}
  ray_actor_options:
    num_cpus: {{ $d.num_cpus }}
{{- if $d.num_gpus }}
    num_gpus: {{ $d.num_gpus }}
{{- end }}
{{- with .env }}
    runtime_env:
      env_vars:
        {{- toYaml . | nindent 8 }}
{{- end }}
{{- end }}

{{/* serveConfigV2: what `tunefetch serve --print-serve-config` prints for the same config. */}}
{{- define "tunefetch.serveConfig" -}}
{{- $config := include "tunefetch.config" . | fromYaml }}
{{- $serving := $config.serving }}
{{- $generator := $serving.generator }}
{{- if and $generator.num_gpus (ne (float64 $generator.num_gpus) (float64 $serving.engine.tensor_parallel_size)) }}
{{- fail (printf "config.serving.generator.num_gpus (%v) must equal config.serving.engine.tensor_parallel_size (%v): each replica shards the model over the GPUs it holds" $generator.num_gpus $serving.engine.tensor_parallel_size) }}
{{- end }}
{{- $env := dict "VLLM_ENABLE_V1_MULTIPROCESSING" "0" }}
{{- if not $generator.num_gpus }}
{{- $_ := set $env "VLLM_CPU_KVCACHE_SPACE" (toString $serving.engine.kv_cache_gib) }}
{{- end }}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ $serving.port }}
applications:
- name: {{ $serving.app_name }}
  route_prefix: /
  import_path: serving.app:app_builder
  args:
    config:
      {{- toYaml $config | nindent 6 }}
  deployments:
  {{- include "tunefetch.deployment" (dict "name" "Gateway" "options" $serving.gateway) | nindent 2 }}
  {{- include "tunefetch.deployment" (dict "name" "Retriever" "options" $serving.retriever) | nindent 2 }}
  {{- include "tunefetch.deployment" (dict "name" "Generator" "options" $generator "env" $env) | nindent 2 }}
{{- end }}

{{/* Environment of every tunefetch container: HOME, secrets (optional Secret keys), extras. */}}
{{- define "tunefetch.env" -}}
- name: TUNEFETCH_HOME
  value: {{ .Values.home.mountPath | quote }}
{{- $secret := .Values.secrets.existingSecret }}
{{- if $secret }}
{{- $vars := dict "milvusToken" "TUNEFETCH_RETRIEVAL__MILVUS_TOKEN" "registryAccessKey" "TUNEFETCH_REGISTRY__ACCESS_KEY" "registrySecretKey" "TUNEFETCH_REGISTRY__SECRET_KEY" "otlpHeaders" "TUNEFETCH_TELEMETRY__HEADERS" }}
{{- range $field, $var := $vars }}
{{- with (get $.Values.secrets.keys $field) }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef: {name: {{ $secret | quote }}, key: {{ . | quote }}, optional: true}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tunefetch.volumeMounts" -}}
- name: home
  mountPath: {{ .Values.home.mountPath }}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  mountPath: {{ include "tunefetch.keysDir" . }}
  readOnly: true
{{- end }}
- name: shm  # Ray's object store and vLLM use /dev/shm
  mountPath: /dev/shm
{{- end }}

{{- define "tunefetch.volumes" -}}
- name: home
{{- if .Values.home.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-home" (include "tunefetch.fullname" .)) .Values.home.persistence.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- with .Values.model.volume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.apiKeys.existingSecret }}
    items: [{key: {{ .Values.apiKeys.key | quote }}, path: {{ .Values.apiKeys.key | quote }}}]
{{- end }}
- name: shm
  emptyDir: {medium: Memory}
{{- end }}

{{/* Probes of Ray containers: liveness on the raylet (via the dashboard agent); readiness on the
Serve proxy's /healthz (answered by the gateway, no key needed) where Serve replicas run. */}}
{{- define "tunefetch.probes" -}}
{{- $raylet := dict "httpGet" (dict "path" "/api/local_raylet_healthz" "port" 52365) }}
{{- $serve := dict "httpGet" (dict "path" "/healthz" "port" (int .root.Values.config.serving.port)) -}}
readinessProbe:
  {{- toYaml (merge (deepCopy (ternary $serve $raylet .serve)) .root.Values.probes.readiness) | nindent 2 }}
livenessProbe:
  {{- toYaml (merge (deepCopy $raylet) .root.Values.probes.liveness) | nindent 2 }}
{{- end }}

{{/*
A Ray pod template: (dict "root" $ "component" NAME "container" NAME "group" VALUES "gpus" N "serve" BOOL);
the group values give resources and placement.
*/}}
{{- define "tunefetch.rayPod" -}}
{{- $root := .root }}
{{- $group := .group -}}
metadata:
  labels:
    {{- include "tunefetch.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  {{- if or $root.Values.metrics.podAnnotations $root.Values.podAnnotations }}
  annotations:
    {{- if $root.Values.metrics.podAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: "8080"
    {{- end }}
    {{- with $root.Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
spec:
  serviceAccountName: {{ include "tunefetch.serviceAccountName" $root }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
  - name: {{ .container }}
    image: {{ include "tunefetch.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    env:
      {{- include "tunefetch.env" $root | nindent 6 }}
    {{- $resources := deepCopy $group.resources }}
    {{- if .gpus }}
    {{- $_ := set $resources.requests "nvidia.com/gpu" .gpus }}
    {{- $_ := set $resources.limits "nvidia.com/gpu" .gpus }}
    {{- end }}
    resources:
      {{- toYaml $resources | nindent 6 }}
    ports:
    {{- if eq .component "head" }}
    - {name: gcs-server, containerPort: 6379}
    - {name: dashboard, containerPort: 8265}
    - {name: client, containerPort: 10001}
    {{- end }}
    {{- if .serve }}
    - {name: serve, containerPort: {{ $root.Values.config.serving.port }}}
    {{- end }}
    - {name: metrics, containerPort: 8080}
    {{- include "tunefetch.probes" (dict "root" $root "serve" .serve) | nindent 4 }}
    volumeMounts:
      {{- include "tunefetch.volumeMounts" $root | nindent 6 }}
  volumes:
    {{- include "tunefetch.volumes" $root | nindent 4 }}
{{- end }}
