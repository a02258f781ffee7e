// Small progressive enhancements; every page works without them.
(function () {
  const PRESET_FIELDS = ["url", "model", "system_prompt", "user_prompt", "custom_id_column", "input_column",
                         "temperature", "max_tokens", "json_schema"];
  let lastPrompt = null;

  document.addEventListener("focusin", (e) => {
    if (e.target.matches("#id_user_prompt, #id_system_prompt")) lastPrompt = e.target;
  });

  document.addEventListener("click", (e) => {
    const insert = e.target.closest("[data-insert]");
    if (insert) {
      const field = lastPrompt || document.getElementById("id_user_prompt");
      if (!field) return;
      const text = "{{ " + insert.dataset.insert + " }}";
      const start = field.selectionStart ?? field.value.length;
      field.value = field.value.slice(0, start) + text + field.value.slice(field.selectionEnd ?? start);
      field.focus();
      field.selectionStart = field.selectionEnd = start + text.length;
      return;
    }
    const preset = e.target.closest("[data-preset]");
    if (preset) {
      const data = JSON.parse(preset.dataset.preset);
      // Every template field is set, to the preset's value or empty: switching from "Extract to
      // JSON" to "Summarise" must not keep the old schema.
      for (const key of PRESET_FIELDS) {
        const field = document.getElementById("id_" + key);
        const value = data[key] ?? "";
        if (!field) continue;
        if (field.tagName === "SELECT" && ![...field.options].some((o) => o.value === String(value))) continue;
        field.value = value;
      }
    }
  });

  // Filters apply as soon as they change (no inline onchange: the Content Security Policy forbids inline script).
  document.addEventListener("change", (e) => {
    if (e.target.matches("[data-autosubmit]")) e.target.form.submit();
  });

  document.addEventListener("submit", (e) => {
    const message = e.target.dataset.confirm;
    if (message && !window.confirm(message)) e.preventDefault();
  });

  function wireDropzone() {
    const zone = document.getElementById("dropzone");
    const input = document.getElementById("id_file");
    if (!zone || !input) return;
    const show = () => {
      document.getElementById("filename").textContent = input.files.length ? input.files[0].name : "";
    };
    input.addEventListener("change", show);
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer.files.length) { input.files = e.dataTransfer.files; show(); }
    });
  }
  document.addEventListener("DOMContentLoaded", wireDropzone);
})();
