{{/* Names, labels and shared snippets of the cloister chart. */}}

{{- define "cloister.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cloister.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cloister.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "cas"). */}}
{{- define "cloister.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cloister.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cloister.labels" -}}
helm.sh/chart: {{ include "cloister.chart" .ctx }}
{{ include "cloister.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: cloister
{{- end -}}

{{/* Labels on the chart's own pods: never let the webhook mutate them. */}}
{{- define "cloister.podLabels" -}}
{{ include "cloister.selectorLabels" . }}
cloister.io/inject: "false"
{{- end -}}

{{- define "cloister.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "cloister.cas.fullname" -}}
{{- printf "%s-cas" (include "cloister.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cloister.operator.fullname" -}}
{{- printf "%s-operator" (include "cloister.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cloister.webhook.fullname" -}}
{{- printf "%s-webhook" (include "cloister.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cloister.webhook.tlsSecret" -}}
{{- default (printf "%s-tls" (include "cloister.webhook.fullname" .)) .Values.webhook.tls.existingSecret -}}
{{- end -}}

{{/* The CAS's in-cluster URL (the CAS serves only HTTPS, with its pinned certificate). */}}
{{- define "cloister.cas.url" -}}
{{- printf "https://%s.%s.svc:%d" (include "cloister.cas.fullname" .) .Release.Namespace (int .Values.cas.port) -}}
{{- end -}}

{{- define "cloister.usesDatabaseUrl" -}}
{{- if or .Values.cas.database.url .Values.cas.database.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Checks of values that templates cannot express otherwise. */}}
{{- define "cloister.validate" -}}
{{- $tees := list "simulation" "sgx" "tdx" "snp" -}}
{{- if not (has .Values.tee.type $tees) -}}
{{- fail (printf "tee.type must be one of %s, not %q" (join ", " $tees) .Values.tee.type) -}}
{{- end -}}
{{- if and (gt (int .Values.cas.replicas) 1) (not (include "cloister.usesDatabaseUrl" .)) -}}
{{- fail "cas.replicas > 1 needs a shared PostgreSQL database: set cas.database.url or cas.database.existingSecret" -}}
{{- end -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.tls.generate) (not .Values.webhook.tls.existingSecret) -}}
{{- fail "webhook.tls: set generate=true, or existingSecret and caBundle" -}}
{{- end -}}
{{- if and .Values.webhook.enabled .Values.webhook.tls.existingSecret (not .Values.webhook.tls.caBundle) -}}
{{- fail "webhook.tls.existingSecret needs webhook.tls.caBundle (the PEM CA that signed it)" -}}
{{- end -}}
{{- end -}}

{{/* Pod spec settings that put the CAS into its TEE. */}}
{{- define "cloister.tee.runtimeClass" -}}
{{- if eq .Values.tee.type "tdx" -}}
runtimeClassName: {{ .Values.tee.tdx.runtimeClassName }}
{{- else if eq .Values.tee.type "snp" -}}
runtimeClassName: {{ .Values.tee.snp.runtimeClassName }}
{{- end -}}
{{- end -}}

{{- define "cloister.serviceAccountName" -}}
{{- if .ctx.Values.serviceAccount.create -}}
{{- printf "%s-%s" (include "cloister.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- else -}}
default
{{- end -}}
{{- end -}}
