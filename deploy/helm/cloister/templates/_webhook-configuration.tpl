{{/*
The MutatingWebhookConfiguration; rendered beside the serving certificate so that its
caBundle always matches. Call with (dict "ctx" $ "caBundle" <base64 PEM>).
*/}}
{{- define "cloister.webhook.configuration" -}}
{{- $ := .ctx -}}
{{- $ctx := dict "ctx" $ "component" "webhook" -}}
{{- $nsSelector := deepCopy (default dict $.Values.webhook.namespaceSelector) -}}
{{- $nsExpr := append (default list (get $nsSelector "matchExpressions")) (dict "key" "cloister.io/webhook" "operator" "NotIn" "values" (list "disabled")) -}}
{{- $_ := set $nsSelector "matchExpressions" $nsExpr -}}
{{- $objSelector := deepCopy (default dict $.Values.webhook.objectSelector) -}}
{{- $objExpr := append (default list (get $objSelector "matchExpressions")) (dict "key" "cloister.io/inject" "operator" "NotIn" "values" (list "false")) -}}
{{- $_ := set $objSelector "matchExpressions" $objExpr -}}
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: {{ include "cloister.webhook.fullname" $ }}
  labels:
    {{- include "cloister.labels" $ctx | nindent 4 }}
webhooks:
  - name: pods.webhook.cloister.io
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: {{ $.Values.webhook.failurePolicy }}
    matchPolicy: Equivalent
    reinvocationPolicy: Never
    timeoutSeconds: {{ $.Values.webhook.timeoutSeconds }}
    clientConfig:
      caBundle: {{ .caBundle }}
      service:
        name: {{ include "cloister.webhook.fullname" $ }}
        namespace: {{ $.Release.Namespace }}
        path: /mutate
        port: 443
    rules:
      - apiGroups: [""]
        apiVersions: [v1]
        operations: [CREATE]
        resources: [pods]
        scope: Namespaced
    namespaceSelector:
      {{- toYaml $nsSelector | nindent 6 }}
    objectSelector:
      {{- toYaml $objSelector | nindent 6 }}
{{- end -}}
